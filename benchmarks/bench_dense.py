"""DenseNet: a training step (fwd + bwd + SGD step) of whole DenseNets, fused against torchvision's
(memory_efficient=False and =True) and torch.compile, with time and memory, in one run.

Memory is measured two ways: `peak_MB`, the CUDA allocator's peak during a step above what the
model and optimizer hold before it (GPU only), and `saved_MB`, the bytes autograd holds for
backward after the forward (saved-tensor hooks; any device, so the CPU run shows the memory
structure too). On a GPU, torchvision's own densenets are the baseline when torchvision imports;
elsewhere fusedres.models' copy of the architecture.

Targets (the dense-block issue): peak memory at or below memory_efficient=True, step time at most
0.9x memory_efficient=False.
"""
import copy
from typing import Dict, List

import torch
import torch.nn as nn

import fusedres
from fusedres.models import DenseBlock, Transition

from common import bench, model_factory, peak_mb, train_step

GPU_MODELS = ("densenet121", "densenet169", "densenet201")


def dense_block_cases(small: bool):
    """(name, stock module, fused class, input shape without batch) for the blocks suite: every
    dense block and transition of DenseNet-121 at 224x224 (GPU), or its first block and
    transition at a quarter of the spatial size (CPU)."""
    if small:
        s = 4
        return [("densenet121 denseblock1 (6 layers)", DenseBlock(6, 64, 4, 32, 0.0), fusedres.FusedDenseBlock,
                 (64, 56 // s, 56 // s)),
                ("densenet121 transition1", Transition(256, 128), fusedres.FusedTransition, (256, 56 // s, 56 // s))]
    cases, channels, size = [], 64, 56
    for i, layers in enumerate((6, 12, 24, 16)):
        cases.append((f"densenet121 denseblock{i + 1} ({layers} layers)", DenseBlock(layers, channels, 4, 32, 0.0),
                      fusedres.FusedDenseBlock, (channels, size, size)))
        channels += 32 * layers
        if i < 3:
            cases.append((f"densenet121 transition{i + 1}", Transition(channels, channels // 2),
                          fusedres.FusedTransition, (channels, size, size)))
            channels //= 2
            size //= 2
    return cases


def saved_megabytes(step_forward, model: nn.Module) -> float:
    """MB of activations autograd saves for backward during step_forward(): distinct storages,
    counted once, the model's parameters and their autocast copies left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_shapes = {tuple(p.shape) for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        # parameters, and autocast's low-precision copies of them (a checkpointed region's copies
        # are not saved, so counting them would favour memory_efficient=True at small batches)
        if s.data_ptr() not in params and tuple(t.shape) not in param_shapes:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step_forward()
    return sum(storages.values()) / 2**20


def run(device: torch.device, dtypes, batches, quick: bool, compile_baseline: bool, compile_mode: str = "default",
        archs=None, image_size: int = 224, progress=None) -> List[Dict[str, object]]:
    small = device.type == "cpu"
    archs = archs or (("densenet121",) if small else GPU_MODELS)
    rows = []
    for arch in archs:
        factory, source = model_factory(arch)
        for dtype in dtypes:
            for batch in batches:
                torch.manual_seed(0)
                base_model = factory(num_classes=100)
                impls = {
                    f"{source} memory_efficient=False": lambda: copy.deepcopy(base_model),
                    f"{source} memory_efficient=True": lambda: _memory_efficient(copy.deepcopy(base_model)),
                    "fusedres": lambda: fusedres.fuse(base_model),  # a deep copy, blocks swapped
                }
                if compile_baseline:
                    impls[f"{source} torch.compile({compile_mode})"] = lambda: torch.compile(
                        copy.deepcopy(base_model), mode=compile_mode)
                xs = [torch.randn(batch, 3, image_size, image_size, device=device).contiguous(
                    memory_format=torch.channels_last) for _ in range(2)]
                labels = torch.randint(0, 100, (batch,), device=device)
                reference_ms = memeff_peak = None
                for impl, make in impls.items():
                    if progress:
                        progress(f"  dense: {arch} {_name(dtype)} batch {batch}: {impl}")
                    model = make().to(device, memory_format=torch.channels_last).train()
                    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                    forward, _ = train_step(model, opt, xs[0], labels, dtype, device)
                    try:
                        ms = bench(lambda i, m=model, o=opt: train_step(m, o, xs[i], labels, dtype, device)[1],
                                   len(xs), device, quick)
                    except torch.cuda.OutOfMemoryError:
                        rows.append(dict(model=arch, impl=impl, dtype=_name(dtype), batch=batch, ms=None,
                                         note="out of memory"))
                        torch.cuda.empty_cache()
                        continue
                    peak = peak_mb(device, train_step(model, opt, xs[0], labels, dtype, device)[1])
                    saved = saved_megabytes(forward, model) if "compile" not in impl else None
                    opt.zero_grad(set_to_none=True)
                    if impl.endswith("memory_efficient=False"):
                        reference_ms = ms
                    if impl.endswith("memory_efficient=True"):
                        memeff_peak = peak if peak is not None else saved
                    row = dict(model=arch, impl=impl, dtype=_name(dtype), batch=batch, ms=ms,
                               images_per_s=batch / (ms * 1e-3), time_vs_stock=ms / reference_ms,
                               peak_MB=peak, saved_MB=saved)
                    mem = peak if peak is not None else saved
                    row["memory_vs_memory_efficient"] = (mem / memeff_peak) if (mem is not None and memeff_peak) else None
                    rows.append(row)
                    del model, opt
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                _judge(rows, arch, dtype, batch)
    return rows


def _memory_efficient(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if hasattr(m, "memory_efficient"):
            m.memory_efficient = True
    return model


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _judge(rows, arch, dtype, batch):
    """Mark the fused row with the issue's two targets, as measured."""
    for r in rows:
        if r["model"] == arch and r["dtype"] == _name(dtype) and r["batch"] == batch and r["impl"] == "fusedres" \
                and r.get("ms") is not None:
            r["target_time_le_0.9x"] = r["time_vs_stock"] <= 0.9
            mem = r.get("memory_vs_memory_efficient")
            r["target_memory_le_memory_efficient"] = None if mem is None else mem <= 1.0
