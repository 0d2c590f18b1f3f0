"""Models: whole-model training step (fwd + bwd + SGD step) and inference throughput in images/s,
with peak memory, for stock eager, stock torch.compile, fused eager (fusedres.fuse) and fused +
torch.compile, in one run, channels_last.

GPU: resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d, wide_resnet50_2 and densenet121
at 224x224 (torchvision's models when it imports); CPU: resnet18 and resnet50 at 64x64, for the
record only (the CPU path is not the product's).
"""
import copy
from typing import Dict, List

import torch

import fusedres

from common import bench, model_factory, peak_mb, train_step

GPU_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
              "resnext101_32x8d", "wide_resnet50_2", "densenet121")
CPU_MODELS = ("resnet18", "resnet50")


def _infer(model, x, dtype, device):
    def step():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            model(x)

    return step


def run(device: torch.device, dtypes, batches, quick: bool, compile_baseline: bool, compile_mode: str = "default",
        archs=None, image_size: int = 224, progress=print) -> List[Dict[str, object]]:
    archs = archs or (CPU_MODELS if device.type == "cpu" else GPU_MODELS)
    rows = []
    for arch in archs:
        factory, source = model_factory(arch)
        for dtype in dtypes:
            for batch in batches:
                torch.manual_seed(0)
                base = factory(num_classes=100).to(device, memory_format=torch.channels_last)
                impls = {f"{source} eager": lambda: copy.deepcopy(base), "fusedres": lambda: fusedres.fuse(base)}
                if compile_baseline:
                    impls[f"{source} torch.compile({compile_mode})"] = lambda: torch.compile(
                        copy.deepcopy(base), mode=compile_mode)
                    impls[f"fusedres + torch.compile({compile_mode})"] = lambda: torch.compile(
                        fusedres.fuse(base), mode=compile_mode)
                xs = [torch.randn(batch, 3, image_size, image_size, device=device).contiguous(
                    memory_format=torch.channels_last) for _ in range(2)]
                labels = torch.randint(0, 100, (batch,), device=device)
                reference = {}
                for impl, make in impls.items():
                    progress(f"  models: {arch} {str(dtype)[6:]} batch {batch}: {impl}")
                    model = make()
                    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                    for mode in ("train", "eval"):
                        model.train(mode == "train")
                        if mode == "train":
                            fn = lambda i, m=model, o=opt: train_step(m, o, xs[i], labels, dtype, device)[1]  # noqa: E731
                        else:
                            fn = lambda i, m=model: _infer(m, xs[i], dtype, device)  # noqa: E731
                        try:
                            ms = bench(fn, len(xs), device, quick)
                        except torch.cuda.OutOfMemoryError:
                            rows.append(dict(model=arch, mode=mode, impl=impl, dtype=str(dtype)[6:], batch=batch,
                                             note="out of memory"))
                            torch.cuda.empty_cache()
                            continue
                        peak = peak_mb(device, fn(0))
                        reference.setdefault(mode, (ms, peak))
                        ref_ms, ref_peak = reference[mode]
                        rows.append(dict(model=arch, mode=mode, impl=impl, dtype=str(dtype)[6:], batch=batch, ms=ms,
                                         images_per_s=batch / (ms * 1e-3), speedup_vs_eager=ref_ms / ms,
                                         peak_MB=peak, memory_vs_eager=(peak / ref_peak) if peak and ref_peak else None))
                    opt.zero_grad(set_to_none=True)
                    del model, opt
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return rows
