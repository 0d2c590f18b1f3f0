"""The one op registry: every backend of every op, and the dispatch between them.

Backends:
  reference  plain PyTorch (any device; also the fallback for unsupported cases)
  cpu        C++ kernels of fusedres._C, CPU tensors
  cuda       CUDA kernels of fusedres._C, CUDA tensors
  triton     Triton kernels, CUDA tensors (CPU tensors too under TRITON_INTERPRET=1)
  onednn     oneDNN primitives through torch.ops.mkldnn (kernels/conv_onednn.py), CPU tensors: the
             inference conv with its post-ops fused
Two ways in, one choice of backend:
  eager      `call` / `kernel`: the implementation resolved once per (op, device type, choice) and
             called directly (a Triton launcher, an extension op torch.ops.fusedres_kernels.<op>):
             the autograd Functions' short path, no custom-op wrapper, no checks on every call
  tracing    torch.library custom ops torch.ops.fusedres.<op>, whose body dispatches the same way
             and which have fake (meta) implementations: torch.compile and torch.export see one
             opaque op with known output shapes, never the launch code of a backend
`set_backend("auto")` (the default, or FUSEDRES_BACKEND) picks, per op, the first of cuda > triton
that implements it on a GPU, and onednn > cpu on the CPU, else reference. A backend that was asked for but
cannot run a call falls back to the reference path and warns once per (op, backend, reason).
"""
import contextlib
import functools
import importlib.util
import os
import threading
from typing import Callable, Dict, Optional, Tuple

import torch

from .. import _extension, _versions
from ..common import tracing, triton_interpreted, warn_once

BACKENDS = ("reference", "cpu", "cuda", "triton", "onednn")
_CHOICES = ("auto",) + BACKENDS

_impls: Dict[str, Dict[str, Callable]] = {}
_loaders: Dict[Tuple[str, str], Callable[[], Callable]] = {}
_kernels: Dict[tuple, Callable] = {}  # (op, device type, backend choice) -> implementation
_state = threading.local()
_default_backend = None


def register(op: str, backend: str):
    """Decorator: fn implements `op` for `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"fusedres: unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn):
        _impls.setdefault(op, {})[backend] = fn
        return fn

    return deco


def register_loader(op: str, backend: str, loader: Callable[[], Callable]) -> None:
    """`loader()` returns the implementation of `op` for `backend` (a Triton launcher, imported only
    when first needed, so `import fusedres` never imports triton; an extension op's OpOverload,
    `.default`: calling the overload skips the packet's per-call overload resolution, ~3 us)."""
    register(op, backend)(loader)
    _loaders[(op, backend)] = loader


def _implementation(op: str, backend: str) -> Callable:
    fn = _impls[op][backend]
    if _loaders.get((op, backend)) is fn:
        fn = fn()
        _impls[op][backend] = fn
        del _loaders[(op, backend)]
    return fn


def _check_choice(name: str, source: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"fusedres: {source} must be one of {_CHOICES}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Choose the kernels: "auto" | "triton" | "cuda" | "cpu" | "onednn" | "reference" (process-wide)."""
    global _default_backend
    _default_backend = _check_choice(name, "backend")


def get_backend() -> str:
    override = getattr(_state, "override", None)
    if override is not None:
        return override
    if _default_backend is not None:
        return _default_backend
    return _env_backend()


_env_data = getattr(os.environ, "_data", None)  # CPython's encoded copy: a plain dict lookup (~0.1 us)
_env_cache = [object(), None]  # [raw FUSEDRES_BACKEND seen last, its checked choice]


def _env_backend() -> str:
    """FUSEDRES_BACKEND, checked; asked on every op call, so the check is redone only when the
    variable changes (os.environ.get costs ~3 us, ~10% of a small op's host time)."""
    raw = _env_data.get(b"FUSEDRES_BACKEND") if isinstance(_env_data, dict) else os.environ.get("FUSEDRES_BACKEND")
    if raw is not _env_cache[0]:
        value = raw.decode() if isinstance(raw, bytes) else raw
        _env_cache[1] = _check_choice(value or "auto", "FUSEDRES_BACKEND")
        _env_cache[0] = raw
    return _env_cache[1]


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily choose a backend in this thread (tests and benchmarks)."""
    _check_choice(name, "backend")
    previous = getattr(_state, "override", None)
    _state.override = name
    try:
        yield
    finally:
        _state.override = previous


# Both asked on every op call (resolve), answered once: the installed versions cannot change.
@functools.lru_cache(maxsize=None)
def _find_triton_missing() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    import triton

    return _versions.triton_too_old(triton.__version__) or None


@functools.lru_cache(maxsize=None)
def _find_triton_interpreter_clash() -> Optional[str]:
    import numpy
    import triton

    return _versions.triton_interpreter_clash(triton.__version__, numpy.__version__) or None


# While tracing, dynamo calls these once and keeps the answer (assume_constant_result; it would
# trace through an lru_cache): torch 2.11's dynamo refuses to trace importlib.util.find_spec, a
# graph break in every fused forward on the triton backend.
@torch.compiler.assume_constant_result
def _triton_missing() -> Optional[str]:
    return _find_triton_missing()


@torch.compiler.assume_constant_result
def _triton_interpreter_clash() -> Optional[str]:
    """Why triton's interpreter cannot run here (an installed triton and numpy that do not work
    together), or None."""
    return _find_triton_interpreter_clash()


def _onednn_missing() -> Optional[str]:
    from ..kernels import conv_onednn  # imports torch only

    return conv_onednn.missing_reason()  # (not cached: torch.backends.mkldnn.enabled can change)


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """None if `backend` can run on `device`, else why not."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if not _extension.loaded():
            return _extension.LOAD_ERROR
        return None if device.type == "cpu" else f"the cpu backend runs CPU tensors, got a {device.type} tensor"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors, got a {device.type} tensor"
        if not _extension.loaded():
            return _extension.LOAD_ERROR
        if not _extension.built_with_cuda():
            return "fusedres._C was built without CUDA kernels"
        return None
    if backend == "onednn":
        if device.type != "cpu":
            return f"the onednn backend runs CPU tensors, got a {device.type} tensor"
        return _onednn_missing()
    if backend == "triton":
        missing = _triton_missing() or (triton_interpreted() and _triton_interpreter_clash())
        if missing:
            return missing
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
            return None
        return f"triton runs CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), got a {device.type} tensor"
    raise ValueError(f"fusedres: unknown backend {backend!r}")


def backends() -> Dict[str, Dict[str, object]]:
    """What each backend can run here: {name: {"cpu": reason-or-True, "cuda": reason-or-True}}."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    table = {}
    for b in BACKENDS:
        table[b] = {}
        for d in devices:
            why = unavailable_reason(b, d)
            table[b][d.type] = True if why is None else why
    table["selected"] = get_backend()
    return table


def _auto(op: str, device: torch.device) -> str:
    """The first backend, in order of preference, that implements `op` and can run on `device`."""
    order = ("cuda", "triton") if device.type == "cuda" else ("onednn", "cpu")
    for b in order:
        if b in _impls[op] and unavailable_reason(b, device) is None:
            return b
    return "reference"


def _chosen(op: str, device: torch.device, choice: str) -> str:
    """The backend `choice` means for `op`: auto's pick; "onednn" (which implements the inference
    conv only) means cpu for every other op."""
    if choice == "auto":
        return _auto(op, device)
    if choice == "onednn" and "onednn" not in _impls[op]:
        return "cpu"
    return choice


_available: Dict[tuple, Optional[str]] = {}  # (op, device type, choice) -> available_backend's answer


def available_backend(op: str, device: torch.device) -> Optional[str]:
    """The backend that runs `op` on `device` under the current choice, or None where that choice
    would fall back to the reference path (no warning: for callers choosing between paths).
    Found once per (op, device type, choice)."""
    choice = get_backend()
    key = (op, device.type, choice)
    if key in _available:
        return _available[key]
    backend = _chosen(op, device, choice)
    if backend not in _impls[op] or unavailable_reason(backend, device) is not None:
        backend = None
    _available[key] = backend
    return backend


def resolve(op: str, device: torch.device) -> Tuple[str, Callable]:
    """(backend, implementation) that runs `op` on `device` under the current choice."""
    impls = _impls[op]
    choice = get_backend()
    backend = _chosen(op, device, choice)
    why = unavailable_reason(backend, device)
    if why is None and backend not in impls:
        why = f"{op} has no {backend} implementation"
    if why is not None:
        if strict():
            raise RuntimeError(f"fusedres: {op}: backend {backend!r} cannot run this call ({why}), and "
                               "FUSEDRES_STRICT=1 forbids falling back to the reference PyTorch path")
        warn_once((op, backend, why), f"fusedres: {op}: backend {backend!r} unavailable ({why}); "
                                      "using the reference PyTorch path")
        backend = "reference"
    return backend, _implementation(op, backend)


def strict() -> bool:
    """FUSEDRES_STRICT=1: a call whose requested backend (or auto's choice) cannot run it raises,
    naming the op, the backend and the reason, instead of warning once and running the reference
    path (for test suites and GPU checks, where a fallback would be a false green)."""
    raw = _env_data.get(b"FUSEDRES_STRICT") if isinstance(_env_data, dict) else os.environ.get("FUSEDRES_STRICT")
    return raw in (b"1", "1")


def kernel(op: str, device: torch.device) -> Callable:
    """The implementation of `op` for `device` under the current backend choice, resolved once per
    (op, device type, choice): what the autograd Functions call in eager mode."""
    key = (op, device.type, get_backend(), strict())
    fn = _kernels.get(key)
    if fn is None:
        fn = _kernels[key] = resolve(op, device)[1]
    return fn


def call(op: str, device: torch.device, *args):
    """Run `op`: its custom op torch.ops.fusedres.<op> while torch.compile / export trace (the graph
    holds that op, with its fake), else the resolved implementation directly (the short path)."""
    if tracing():
        return getattr(torch.ops.fusedres, op)(*args)
    return kernel(op, device)(*args)


def register_fake(op: str, fake: Callable) -> None:
    """`fake` as the fake implementation of torch.ops.fusedres.<op> and, where the extension has
    the same op (the C++ / CUDA kernels), of torch.ops.fusedres_kernels.<op>."""
    torch.library.register_fake(f"fusedres::{op}")(fake)
    if _extension.loaded() and hasattr(torch.ops.fusedres_kernels, op):
        torch.library.register_fake(f"fusedres_kernels::{op}")(fake)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def dispatch(op: str, device: torch.device, *args):
    """The body of custom op torch.ops.fusedres.<op>: run the implementation `kernel` picks. A
    custom op's outputs may alias neither its inputs nor each other, so an output sharing memory
    with either (a reference path returning x unchanged, two statistics vectors that are rows of
    one buffer) comes back as a copy."""
    result = kernel(op, device)(*args)
    seen = {_storage(a) for a in args if isinstance(a, torch.Tensor) and a.numel()}

    def unaliased(t):
        if not isinstance(t, torch.Tensor) or not t.numel():
            return t
        if _storage(t) in seen:
            return t.clone()
        seen.add(_storage(t))
        return t

    if isinstance(result, torch.Tensor):
        return unaliased(result)
    return tuple(unaliased(r) for r in result)


def implementations(op: str) -> Dict[str, Callable]:
    """Every registered backend of `op` (tests check them against each other)."""
    return {backend: _implementation(op, backend) for backend in list(_impls[op])}
