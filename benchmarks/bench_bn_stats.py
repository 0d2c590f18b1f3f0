"""bn_stats: achieved GB/s of each backend against torch.var_mean, at ResNet-50 activation sizes."""
from typing import Dict, List

import torch

from fusedres import ops
from fusedres.ops.registry import unavailable_reason

from common import bench, on_backend


def resnet50_activation_shapes(batch: int, small: bool) -> List[tuple]:
    """Per-stage activations of ResNet-50 at 224x224 (small: 56x56 input for CPU runs)."""
    s = 4 if small else 1
    return [(batch, 64, 112 // s, 112 // s), (batch, 256, 56 // s, 56 // s), (batch, 128, 28 // s, 28 // s),
            (batch, 1024, 14 // s, 14 // s), (batch, 2048, 7 // s, 7 // s)]


def fast_backends(device: torch.device) -> List[str]:
    return [b for b in ("cuda", "triton", "cpu") if unavailable_reason(b, device) is None
            and not (b == "triton" and device.type == "cpu")]  # the interpreter is not a benchmark


def run(device: torch.device, dtypes, batch: int, copy_gbps: float, quick: bool) -> List[Dict[str, object]]:
    rows = []
    for shape in resnet50_activation_shapes(batch, device.type == "cpu"):
        for dtype in dtypes:
            xs = [torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last) + 1
                  for _ in range(3)]
            nbytes = xs[0].numel() * xs[0].element_size()
            candidates = {"eager var_mean": lambda i: (lambda: torch.var_mean(xs[i], dim=(0, 2, 3)))}
            for b in fast_backends(device):
                candidates[f"fusedres {b}"] = lambda i, b=b: on_backend(b, lambda: ops.bn_stats(xs[i], 1e-5))
            base_ms = None
            for name, fn in candidates.items():
                ms = bench(fn, len(xs), device, quick)
                base_ms = base_ms or ms
                gbps = nbytes / (ms * 1e-3) / 1e9
                rows.append(dict(op="bn_stats", impl=name, shape=str(shape), dtype=str(dtype).replace("torch.", ""),
                                 ms=ms, GBps=gbps, pct_copy_bw=100 * gbps / copy_gbps, speedup_vs_eager=base_ms / ms))
    return rows
