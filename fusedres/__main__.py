"""Command line: `python -m fusedres fuse --arch resnet50 [--batch N] [--device cpu|cuda]`.

Builds the architecture (torchvision's when it imports, else fusedres.models' copy), fuses it,
prints the report (blocks swapped / left, with reasons), the largest output difference against
the original (train-mode forward, same input and weights) and the time of one forward + backward
before and after.
"""
import argparse
import copy
import statistics
import sys
import time

import torch


def _build(arch: str):
    try:
        import torchvision

        if hasattr(torchvision.models, arch):
            return getattr(torchvision.models, arch)(), "torchvision"
    except ImportError:
        pass
    from . import models

    if not hasattr(models, arch):
        raise SystemExit(f"fusedres fuse: unknown --arch {arch!r}")
    return getattr(models, arch)(), "fusedres.models"


def _step_ms(model, x, device, repeats):
    def step():
        model(x).float().sum().backward()

    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fuse_command(args) -> int:
    from . import fuse, fuse_report

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model, source = _build(args.arch)
    model = model.to(device, memory_format=torch.channels_last).train()
    fused = fuse(model)
    print(f"{args.arch} ({source}) on {device}, batch {args.batch}, {args.size}x{args.size}, channels_last")
    print(fuse_report(fused))
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        reference, ours = copy.deepcopy(model)(x), copy.deepcopy(fused)(x)  # copies: running stats untouched
    diff = (ours.double() - reference.double()).abs().max().item()
    print(f"largest output difference (train-mode forward, float32): {diff:.3g} "
          f"(largest output {reference.abs().max().item():.3g})")
    before = _step_ms(model, x, device, args.repeats)
    after = _step_ms(fused, x, device, args.repeats)
    print(f"forward + backward: original {before:.2f} ms, fused {after:.2f} ms ({before / after:.2f}x)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedres", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fuse", help="fuse a model and report what was swapped, the difference and the speed")
    p.add_argument("--arch", default="resnet50", help="a torchvision / fusedres.models architecture name")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224, help="image height and width")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.command == "fuse":
        return fuse_command(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
