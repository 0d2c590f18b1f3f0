"""Version checks, parsed with packaging.version (a string comparison orders "2.10" before "2.4").

torch >= 2.4: torch.library.custom_op, which registers every op. triton >= 3.0: the Triton
kernels' language features. Supported (tested in CI at both ends, README "Supported versions"):
torch 2.11 / triton 3.6 (the GPU machine's) to torch 2.15 / triton 3.9.
"""
from packaging.version import Version

MIN_TORCH = "2.4"
MIN_TRITON = "3.0"
SUPPORTED_TORCH = ("2.11", "2.15")  # oldest and newest minor versions CI tests
# triton-lang/triton#9171: before 3.7 the interpreter converts one-element arrays with int(),
# which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars")
INTERPRETER_NUMPY_FIXED_IN = "3.7"


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


def triton_interpreter_clash(triton_version: str, numpy_version: str) -> str:
    """Why triton's interpreter (TRITON_INTERPRET=1) cannot run with this numpy, or "" if it can."""
    if at_least(triton_version, INTERPRETER_NUMPY_FIXED_IN) or not at_least(numpy_version, "2.4"):
        return ""
    return (f"triton {triton_version}'s interpreter fails with numpy {numpy_version} (triton-lang/triton#9171, "
            f"fixed in triton {INTERPRETER_NUMPY_FIXED_IN}): install numpy<2.4 or triton>={INTERPRETER_NUMPY_FIXED_IN}")
