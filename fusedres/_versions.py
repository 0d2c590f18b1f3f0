"""Version checks, parsed with packaging.version (a string comparison orders "2.10" before "2.4").

torch >= 2.4: torch.library.custom_op, which registers every op. triton >= 3.0: the Triton
kernels' language features; tested on torch 2.11 / triton 3.6 and torch 2.13 / triton 3.9.
"""
from packaging.version import Version

MIN_TORCH = "2.4"
MIN_TRITON = "3.0"


def at_least(version: str, minimum: str) -> bool:
    """Whether `version` (e.g. "2.11.0a0+git1234", "2.13.0+cpu") is at least `minimum`; a
    pre-release or local build of a release counts as that release."""
    return Version(version).release >= Version(minimum).release


def check_torch(version: str) -> None:
    if not at_least(version, MIN_TORCH):
        raise ImportError(f"fusedres needs torch >= {MIN_TORCH} (torch.library.custom_op), found torch {version}")


def triton_too_old(version: str) -> str:
    """Why the triton backend cannot run with this triton version, or "" if it can."""
    if at_least(version, MIN_TRITON):
        return ""
    return f"triton {version} is older than the {MIN_TRITON} the Triton kernels need"
