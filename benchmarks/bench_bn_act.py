"""Normalize-activate, forward and backward: achieved GB/s against eager BN + add + ReLU and torch.compile."""
from typing import Dict, List

import torch
import torch.nn.functional as F

from fusedres import ops

from bench_bn_stats import fast_backends, resnet50_activation_shapes
from common import bench, on_backend


def _stock_train(x, gamma, beta, residual):
    """What eager PyTorch runs after a conv in training: BN (stats + normalize), add, ReLU."""
    y = F.batch_norm(x, None, None, gamma, beta, training=True)
    return torch.relu(y + residual)


def run(device: torch.device, dtypes, batch: int, copy_gbps: float, quick: bool, compile_baseline: bool
        ) -> List[Dict[str, object]]:
    rows = []
    compiled = torch.compile(_stock_train) if compile_baseline else None
    for shape in resnet50_activation_shapes(batch, device.type == "cpu"):
        c = shape[1]
        for dtype in dtypes:
            def act():
                return torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            xs, rs, gs = [act() + 1 for _ in range(3)], [act() for _ in range(3)], [act() for _ in range(3)]
            mean, scale, shift = (torch.randn(c, device=device) for _ in range(3))
            gamma, beta = torch.ones(c, device=device), torch.zeros(c, device=device)
            elem = xs[0].numel() * xs[0].element_size()
            y = [ops.bn_act_forward(xs[i], mean, scale, shift, rs[i], True) for i in range(3)]

            cases = []
            # Whole BN + add + ReLU in training (statistics + normalize): fused vs eager vs compiled.
            def train_forward(i):
                m, inv = ops.bn_stats(xs[i], 1e-5)
                ops.bn_act_forward(xs[i], m, inv, shift, rs[i], True)

            def backward(i):
                s1, s2, dz = ops.bn_act_backward_reduce(gs[i], xs[i], mean, scale, shift, y[i], True, True)
                ops.bn_act_backward_elementwise(dz, xs[i], mean, scale, shift, s1, s2, False)

            for b in fast_backends(device):
                cases.append(("train fwd: stats+bn_act+add", f"fusedres {b}",
                              lambda i, b=b: on_backend(b, lambda: train_forward(i)), 4 * elem))
                cases.append(("bn_act fwd (+residual)", f"fusedres {b}",
                              lambda i, b=b: on_backend(b, lambda: ops.bn_act_forward(xs[i], mean, scale, shift,
                                                                                      rs[i], True)), 3 * elem))
                # reduce: read g, x, y, write dz; elementwise: read dz, x, write dx
                cases.append(("bn_act bwd (+residual)", f"fusedres {b}",
                              lambda i, b=b: on_backend(b, lambda: backward(i)), 7 * elem))
            cases.append(("train fwd: stats+bn_act+add", "eager BN+add+ReLU",
                          lambda i: (lambda: _stock_train(xs[i], gamma, beta, rs[i])), 4 * elem))
            if compiled is not None:
                cases.append(("train fwd: stats+bn_act+add", "torch.compile BN+add+ReLU",
                              lambda i: (lambda: compiled(xs[i], gamma, beta, rs[i])), 4 * elem))
            for op, impl, fn, nbytes in cases:
                ms = bench(fn, 3, device, quick)
                gbps = nbytes / (ms * 1e-3) / 1e9
                rows.append(dict(op=op, impl=impl, shape=str(shape), dtype=str(dtype).replace("torch.", ""), ms=ms,
                                 GBps=gbps, pct_copy_bw=100 * gbps / copy_gbps))
    # speedup of each train-forward row against eager in the same (shape, dtype)
    eager = {(r["shape"], r["dtype"]): r["ms"] for r in rows if r["impl"] == "eager BN+add+ReLU"}
    for r in rows:
        if r["op"].startswith("train fwd"):
            r["speedup_vs_eager"] = eager[(r["shape"], r["dtype"])] / r["ms"]
    return rows
