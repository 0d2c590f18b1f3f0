"""Conv kernels: every distinct conv of ResNet-50 and ResNeXt-50 32x4d, forward, input gradient
and weight gradient, TFLOP/s of the fusedres Triton kernels and of cuDNN (aten) in the same run.

GPU only: the Triton kernels run on the CPU only under the interpreter, which is no benchmark.
Plain kernels are compared (no BatchNorm fused), so the ratio is of the convolutions alone; what
the fusions save shows in the blocks suite.
"""
import math
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from fusedres import ops
from fusedres.models import resnet50, resnext50_32x4d

from common import bench, distinct_submodules, on_backend


def distinct_convs(batch: int):
    """(model, conv name, x shape, weight shape, stride, padding, groups) for each distinct conv at 224x224."""
    convs, seen = [], set()
    for arch, make in (("resnet50", resnet50), ("resnext50_32x4d", resnext50_32x4d)):
        for name, m, shape in distinct_submodules(
                make(), lambda name, m: isinstance(m, nn.Conv2d),
                lambda m, shape: (shape, tuple(m.weight.shape), m.stride, m.padding, m.groups)):
            key = (shape, tuple(m.weight.shape), m.stride, m.padding, m.groups)
            if key not in seen:  # ResNeXt-50 shares its stem and some 1x1 convs with ResNet-50
                seen.add(key)
                convs.append((arch, name, (batch,) + shape, tuple(m.weight.shape), m.stride, m.padding, m.groups))
    return convs


def _flops(x_shape, w_shape, out_hw) -> float:
    return 2.0 * x_shape[0] * out_hw[0] * out_hw[1] * w_shape[0] * w_shape[1] * w_shape[2] * w_shape[3]


def run(device: torch.device, dtypes, batch: int, matmul_tflops: float, quick: bool) -> List[Dict[str, object]]:
    rows = []
    if device.type != "cuda":
        return rows
    for arch, name, x_shape, w_shape, stride, padding, groups in distinct_convs(batch):
        for dtype in dtypes:
            xs = [torch.randn(x_shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
                  for _ in range(2)]
            w = (torch.randn(w_shape, device=device, dtype=dtype) / math.sqrt(w_shape[1] * w_shape[2] * w_shape[3]))
            w = w.contiguous(memory_format=torch.channels_last)
            y = F.conv2d(xs[0], w, None, stride, padding, 1, groups)
            gs = [torch.randn_like(y) for _ in range(2)]
            flops = _flops(x_shape, w_shape, y.shape[2:])
            conv = (stride, padding, (1, 1), groups)

            def aten_backward(i, mask):
                return lambda: torch.ops.aten.convolution_backward(gs[i], xs[i], w, None, list(stride), list(padding),
                                                                   [1, 1], False, [0, 0], groups, mask)
            cases = {
                "forward": (lambda i: (lambda: F.conv2d(xs[i], w, None, stride, padding, 1, groups)),
                            lambda i: on_backend("triton", lambda: ops.conv2d_forward(xs[i], w, None, *conv))),
                "input grad": (lambda i: aten_backward(i, [True, False, False]),
                               lambda i: on_backend("triton", lambda: ops.conv2d_input_grad(gs[i], w, xs[i], *conv))),
                "weight grad": (lambda i: aten_backward(i, [False, True, False]),
                                lambda i: on_backend("triton", lambda: ops.conv2d_weight_grad(gs[i], xs[i], w, *conv))),
            }
            for pass_name, (cudnn, ours) in cases.items():
                ms_cudnn = bench(cudnn, 2, device, quick)
                ms_ours = bench(ours, 2, device, quick)
                rows.append(dict(arch=arch, conv=name, x=str(tuple(x_shape[1:])), w=str(tuple(w_shape)),
                                 stride=stride[0], groups=groups, dtype=str(dtype).replace("torch.", ""),
                                 kind=pass_name, ms_cudnn=ms_cudnn, ms_fusedres=ms_ours,
                                 TFLOPs_cudnn=flops / ms_cudnn / 1e9, TFLOPs_fusedres=flops / ms_ours / 1e9,
                                 pct_matmul_peak=100 * flops / ms_ours / 1e9 / matmul_tflops,
                                 speedup_vs_cudnn=ms_cudnn / ms_ours))
    return rows


def summary(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Geometric-mean speedup over cuDNN per (dtype, pass, dense or grouped), and the slowest conv."""
    out = []
    keys = sorted({(r["dtype"], r["kind"], r["groups"] > 1) for r in rows})
    for dtype, kind, grouped in keys:
        sel = [r for r in rows if (r["dtype"], r["kind"], r["groups"] > 1) == (dtype, kind, grouped)]
        gm = math.exp(sum(math.log(r["speedup_vs_cudnn"]) for r in sel) / len(sel))
        worst = min(sel, key=lambda r: r["speedup_vs_cudnn"])
        out.append(dict(dtype=dtype, kind=kind, convs="grouped" if grouped else "dense", count=len(sel),
                        geomean_speedup_vs_cudnn=gm, worst=f"{worst['conv']} {worst['x']} {worst['w']}",
                        worst_speedup=worst["speedup_vs_cudnn"]))
    return out
