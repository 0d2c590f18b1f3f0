"""Blocks: fused vs stock residual and dense blocks (same weights), train step (fwd + bwd) and eval forward.

On a GPU in channels_last the fused blocks run the conv-BN-ReLU chain on the Triton conv kernels
(BatchNorm in the convs' prologues and epilogues); on the CPU, aten's conv with the C++ BN kernels."""
import copy
from typing import Dict, List

import torch
import torch.nn as nn

from fusedres import FusedBasicBlock, FusedBottleneck
from fusedres.models import BasicBlock, Bottleneck

from bench_dense import dense_block_cases
from common import bench, distinct_submodules, peak_mb


def model_blocks(arch: str):
    """(name, stock block, fused class, input shape without batch) for every distinct residual
    block of a fusedres.models architecture at 224x224 (distinct: constructor arguments and input
    size; later repeats of a stage's block are the same computation)."""
    from fusedres import models

    def label(name, block):
        conv2 = block.conv2
        return (f"{arch} {name} {type(block).__name__}" + (f" g{conv2.groups}" if conv2.groups > 1 else "")
                + (" s2" if conv2.stride[0] == 2 else ""))

    blocks = distinct_submodules(
        getattr(models, arch)(), lambda name, m: isinstance(m, (BasicBlock, Bottleneck)),
        lambda m, shape: (type(m).__name__, shape, m.conv2.stride, m.conv2.groups, m.downsample is not None,
                          tuple(m.conv1.weight.shape)))
    return [(label(name, m), m, FusedBottleneck if isinstance(m, Bottleneck) else FusedBasicBlock, shape)
            for name, m, shape in blocks]


def block_cases(small: bool):
    """(name, stock block, fused class, input shape without batch). GPU: every distinct block of
    ResNet-50 and ResNeXt-50 32x4d and every dense block and transition of DenseNet-121 at
    224x224; CPU: a few ResNet-18/50, ResNeXt and DenseNet-121 blocks at a quarter of the spatial
    size."""
    if not small:
        return model_blocks("resnet50") + model_blocks("resnext50_32x4d") + dense_block_cases(small)
    s = 4

    def down(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    return [
        ("resnet18 layer1 BasicBlock", BasicBlock(64, 64), FusedBasicBlock, (64, 56 // s, 56 // s)),
        ("resnet18 layer3.0 BasicBlock s2", BasicBlock(128, 256, 2, down(128, 256, 2)), FusedBasicBlock,
         (128, 28 // s, 28 // s)),
        ("resnet50 layer1.1 Bottleneck", Bottleneck(256, 64), FusedBottleneck, (256, 56 // s, 56 // s)),
        ("resnet50 layer2.0 Bottleneck s2", Bottleneck(256, 128, 2, down(256, 512, 2)), FusedBottleneck,
         (256, 56 // s, 56 // s)),
        ("resnet50 layer4.1 Bottleneck", Bottleneck(2048, 512), FusedBottleneck, (2048, 7 // s if small else 7, 7)),
        ("resnext50 layer1.1 Bottleneck g32x4", Bottleneck(256, 64, groups=32, base_width=4), FusedBottleneck,
         (256, 56 // s, 56 // s)),
        ("resnext50 layer3.0 Bottleneck g32x16 s2", Bottleneck(512, 256, 2, down(512, 1024, 2), groups=32,
                                                              base_width=4), FusedBottleneck, (512, 28 // s, 28 // s)),
    ] + dense_block_cases(small)


def graphed_inference(module, x, dtype):
    """A CUDA-graph replay of module(x) in eval under no_grad (static input x): warmed up first,
    so the fused convs' autotuning runs outside the capture."""
    amp = dtype != torch.float32
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=amp):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                module(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            module(x)
    return graph.replay


def run(device: torch.device, dtypes, batch: int, quick: bool, compile_baseline: bool,
        compile_mode: str = "default", only: str = "", progress=None) -> List[Dict[str, object]]:
    rows = []
    cases = [c for c in block_cases(device.type == "cpu") if not only or only in c[0]]
    for number, (name, stock, fused_cls, shape) in enumerate(cases):
        if progress:
            progress(f"  blocks [{number + 1}/{len(cases)}] {name}")
        for dtype in dtypes:
            stock_m = copy.deepcopy(stock).to(device, memory_format=torch.channels_last)
            fused_m = fused_cls.from_module(copy.deepcopy(stock_m))
            models = {"stock eager": stock_m, "fusedres": fused_m}
            if compile_baseline:
                models[f"stock torch.compile({compile_mode})"] = torch.compile(copy.deepcopy(stock_m), mode=compile_mode)
            xs = [torch.randn(batch, *shape, device=device).contiguous(memory_format=torch.channels_last)
                  for _ in range(3)]
            amp = dtype != torch.float32
            for mode in ("train", "eval"):
                base = None
                for impl, m in models.items():
                    m.train(mode == "train")

                    def make(i, m=m, mode=mode):
                        x = xs[i].requires_grad_(mode == "train")

                        def call():
                            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                                if mode == "train":
                                    m(x).float().sum().backward()
                                else:
                                    with torch.no_grad():
                                        m(x)
                        return call
                    ms = bench(make, len(xs), device, quick)
                    base = base or ms
                    peak = peak_mb(device, make(0))
                    rows.append(dict(block=name, mode=mode, impl=impl, dtype=str(dtype).replace("torch.", ""),
                                     batch=batch, ms=ms, speedup_vs_eager=base / ms, peak_MB=peak))
                    if mode == "eval" and device.type == "cuda" and impl in ("stock eager", "fusedres"):
                        # CUDA graphs remove the launch overhead of both; inference only (a training
                        # step would need static gradients and optimizer state)
                        label = f"{impl} + CUDA graph"
                        try:
                            replays = [graphed_inference(m, xs[i], dtype) for i in range(len(xs))]
                            g_ms = bench(lambda i: replays[i], len(xs), device, quick)
                            rows.append(dict(block=name, mode=mode, impl=label, dtype=str(dtype).replace("torch.", ""),
                                             batch=batch, ms=g_ms, speedup_vs_eager=base / g_ms, peak_MB=None))
                        except Exception as e:  # reported, not hidden: a capture that fails is a finding
                            rows.append(dict(block=name, mode=mode, impl=label, dtype=str(dtype).replace("torch.", ""),
                                             batch=batch, ms=None, note=f"capture failed: {type(e).__name__}: {e}"[:200]))
    return rows
