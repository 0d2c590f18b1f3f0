"""How many of a model's BatchNorm layers fusedres.fuse fuses, over torchvision's and timm's BN
CNNs: the report's count (FuseReport.batchnorms) and, as the independent check, the BatchNorm
kernels aten still runs in a fused model's train-step forward and eval forward (counted with a
TorchDispatchMode: every aten op whose name holds "batch_norm"; the fused paths call
torch.ops.fusedres ops instead). Fused paths forced (FUSEDRES_CPU_TRAIN_PATH=fused), batch 2.

    python benchmarks/bn_coverage.py [--models NAME ...] [--out FILE.json]

Prints a table (model, BN layers, fused by the report (of them, BatchNorm -> ReLU fused without a
conv: a pre-activation norm whose output feeds two convs, the norm before a head), aten BN calls
train / eval, what is left and why, grouped) and writes it as JSON."""
import argparse
import collections
import json
import os
import sys

os.environ.setdefault("FUSEDRES_CPU_TRAIN_PATH", "fused")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fusedres  # noqa: E402

# (name, library, constructor name, input size)
MODELS = [
    ("resnet50", "tv", "resnet50", 64), ("resnext50_32x4d", "tv", "resnext50_32x4d", 64),
    ("wide_resnet50_2", "tv", "wide_resnet50_2", 64), ("densenet121", "tv", "densenet121", 64),
    ("mobilenet_v2", "tv", "mobilenet_v2", 64), ("mobilenet_v3_large", "tv", "mobilenet_v3_large", 64),
    ("efficientnet_b0", "tv", "efficientnet_b0", 64), ("regnet_x_400mf", "tv", "regnet_x_400mf", 64),
    ("regnet_y_400mf", "tv", "regnet_y_400mf", 64), ("mnasnet1_0", "tv", "mnasnet1_0", 64),
    ("shufflenet_v2_x1_0", "tv", "shufflenet_v2_x1_0", 64), ("googlenet", "tv", "googlenet", 64),
    ("inception_v3", "tv", "inception_v3", 96), ("vgg11_bn", "tv", "vgg11_bn", 64),
    ("timm_resnetv2_50", "timm", "resnetv2_50", 64), ("timm_seresnext50_32x4d", "timm", "seresnext50_32x4d", 64),
    ("timm_ecaresnet50d", "timm", "ecaresnet50d", 64), ("timm_regnety_008", "timm", "regnety_008", 64),
    ("timm_mobilenetv3_large_100", "timm", "mobilenetv3_large_100", 64),
    ("timm_efficientnet_b0", "timm", "efficientnet_b0", 64),
]


class CountBatchNorm(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "batch_norm" in func.name():
            self.calls += 1
        return func(*args, **(kwargs or {}))


def build(library: str, name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if library == "tv":
        import torchvision
        kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        return getattr(torchvision.models, name)(num_classes=10, **kwargs)
    import timm
    return timm.create_model(name, pretrained=False, num_classes=10)


def aten_bn_calls(model: torch.nn.Module, x: torch.Tensor, training: bool) -> int:
    model.train(training)
    counter = CountBatchNorm()
    with counter, torch.set_grad_enabled(training):
        model(x)
    return counter.calls


def measure(name: str, library: str, ctor: str, size: int) -> dict:
    model = build(library, ctor)
    fused = fusedres.fuse(model)
    report = fusedres.fuse_report(fused)
    x = torch.randn(2, 3, size, size)
    reasons = collections.Counter(_short(e.detail) for e in report.bn_left)
    alone = sum(e.status == "fused" and "no conv fused" in e.detail for e in report.batchnorms)
    return {"model": name, "bn_layers": len(report.batchnorms), "fused": report.bn_fused, "fused_without_conv": alone,
            "aten_bn_train": aten_bn_calls(fused, x, True), "aten_bn_eval": aten_bn_calls(fused, x, False),
            "stock_aten_bn_eval": aten_bn_calls(model, x, False),
            "left": dict(reasons.most_common())}


def _short(detail: str, limit: int = 110) -> str:
    """A reason without the module paths, so equal reasons group."""
    if "left: " in detail:
        detail = detail.split("left: ", 1)[1]
    if "]: " in detail:
        detail = detail.split("]: ", 1)[1]
    return detail[:limit]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = []
    for name, library, ctor, size in MODELS:
        if args.models and name not in args.models:
            continue
        row = measure(name, library, ctor, size)
        rows.append(row)
        share = row["fused"] / max(row["bn_layers"], 1)
        print(f"{name:28s} BN {row['bn_layers']:4d}  fused {row['fused']:4d} ({share:6.1%}; "
              f"{row['fused_without_conv']:3d} BN -> ReLU only)  aten BN calls "
              f"train {row['aten_bn_train']:4d} eval {row['aten_bn_eval']:4d} (stock eval {row['stock_aten_bn_eval']})",
              flush=True)
        for why, n in row["left"].items():
            print(f"      {n:4d} left: {why}")
    total, fused = sum(r["bn_layers"] for r in rows), sum(r["fused"] for r in rows)
    alone = sum(r["fused_without_conv"] for r in rows)
    print(f"all: {fused} of {total} BatchNorm layers fused ({fused / max(total, 1):.1%}); {fused - alone} into a conv "
          f"({(fused - alone) / max(total, 1):.1%}), {alone} as BatchNorm -> ReLU in one pass without a conv")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
