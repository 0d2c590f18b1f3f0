"""Timing, device ceilings and result rows shared by the benchmarks.

GPU: CUDA-event timing through triton.testing.do_bench (median), after warm-up, rotating among
several input sets so repeated runs do not read from L2 (50 MB on H100). CPU: median of
perf_counter over repeats. Ratios are only ever taken between figures of the same run.
"""
import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch


def environment() -> Dict[str, object]:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, sm_count=p.multi_processor_count, device_memory_gb=round(p.total_memory / 2**30, 1))
    else:
        info["device"] = "cpu"
    import fusedres

    info["fusedres_backends"] = {k: v for k, v in fusedres.backends().items()}
    return info


def bench(fn_for_input: Callable[[int], Callable[[], object]], n_inputs: int, device: torch.device,
          quick: bool = False) -> float:
    """Median milliseconds of fn_for_input(i)() with i rotating over n_inputs prepared inputs."""
    calls = [fn_for_input(i) for i in range(n_inputs)]
    state = {"i": 0}

    def step():
        calls[state["i"] % n_inputs]()
        state["i"] += 1

    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(step, warmup=10 if quick else 25, rep=40 if quick else 100,
                                             return_mode="median"))
    for _ in range(2):
        step()
    times = []
    for _ in range(5 if quick else 15):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def on_backend(backend: str, fn: Callable[[], object]) -> Callable[[], None]:
    """fn, run with fusedres dispatching to `backend`."""
    import fusedres

    def call():
        with fusedres.use_backend(backend):
            fn()

    return call


def copy_bandwidth_gbps(device: torch.device, quick: bool = False) -> float:
    """Measured device copy bandwidth (bytes read + written) with a buffer far over cache size."""
    numel = (256 if device.type == "cuda" else 16) * 2**20  # 1 GiB / 64 MiB of float32
    src = [torch.randn(numel, device=device) for _ in range(2)]
    dst = torch.empty_like(src[0])
    ms = bench(lambda i: (lambda: dst.copy_(src[i])), 2, device, quick)
    return 2 * numel * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, quick: bool = False) -> float:
    """Measured dense matmul rate: bf16 8192^3 on a GPU, float32 1024^3 on the CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = [torch.randn(n, n, device=device, dtype=dtype) for _ in range(2)]
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = bench(lambda i: (lambda: a[i] @ b), 2, device, quick)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def distinct_submodules(model: torch.nn.Module, wanted: Callable[[str, torch.nn.Module], bool],
                        key: Callable[[torch.nn.Module, tuple], object], image_size: int = 224):
    """(name, module, input shape without batch) of the first submodule of each distinct key among
    those `wanted`, in forward order, from one batch-1 forward at image_size x image_size."""
    found, seen, hooks = [], set(), []
    for name, m in model.named_modules():
        if wanted(name, m):
            def hook(mod, inputs, _out, name=name):
                shape = tuple(inputs[0].shape[1:])
                k = key(mod, shape)
                if k not in seen:
                    seen.add(k)
                    found.append((name, mod, shape))
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, image_size, image_size))
    for h in hooks:
        h.remove()
    return found


def model_factory(arch: str):
    """(constructor, source) of a torchvision architecture: torchvision's own when it imports (a
    GPU machine), else fusedres.models' copy (same architecture and keys)."""
    try:
        import torchvision

        return getattr(torchvision.models, arch), "torchvision"
    except ImportError:
        from fusedres import models

        return getattr(models, arch), "fusedres.models"


def train_step(model, opt, x, labels, dtype, device):
    """(forward, step) of a classifier's training step: forward() returns the cross-entropy loss
    under autocast when dtype is not float32; step() is forward + backward + optimizer step."""
    def forward():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return torch.nn.functional.cross_entropy(model(x).float(), labels)

    def step():
        forward().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return forward, step


def peak_mb(device: torch.device, fn: Callable[[], object]):
    """MB the CUDA allocator's peak rises above what is allocated before fn() (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def write_json(path: str, payload: Dict[str, object]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)


def table(rows: List[Dict[str, object]], columns: Sequence[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
