"""Issue 25's memory suite: what a training forward keeps for backward, stock against fused, and what
keeping less costs in step time.

    python benchmarks/bench_memory.py [--out DIR] [--quick]

Saved bytes (fusedres.memory_report: every tensor autograd keeps after one training forward, per
storage once, parameters, buffers and the input left out) at batch 8, 112x112, float32
channels_last, for ResNet-18, ResNet-50, ResNeXt-50, DenseNet-121, MobileNetV2 and
EfficientNet-B0 (torchvision's where it imports, else fusedres.models' ResNets and DenseNet), with
the fused path forced (what a GPU runs; the same bytes on any device) and with
memory_efficient=True; a PNG per model when matplotlib imports. Then on the CPU the train-step time
of ResNet-50 and MobileNetV2 at batch 8, 112x112: stock, fusedres as it runs by default (the CPU's
measured choice: the lean fused units where they cost at most FUSEDRES_CPU_TRAIN_SLOWDOWN, 5%, over
stock) and fusedres memory_efficient=True, interleaved in one process (median per-step ms over
rounds), with how many of the fused modules' measured choices ran fused.
"""
import argparse
import copy
import datetime
import os
import statistics
import sys
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

import fusedres
from common import environment, model_factory, table, write_json

MODELS = ("resnet18", "resnet50", "resnext50_32x4d", "densenet121", "mobilenet_v2", "efficientnet_b0")
# issue 25's goals, fused / stock saved bytes on the default path
GOALS = {"resnet18": 0.76, "resnet50": 0.85, "mobilenet_v2": 0.6, "efficientnet_b0": 0.5, "densenet121": 0.35}
EFFICIENT_GOALS = {"resnet50": 0.55}
TIMED = ("resnet50", "mobilenet_v2")


def saved_bytes(archs=MODELS, batch: int = 8, size: int = 112, out_dir: str = None, cpu_default: bool = True,
                progress=print) -> List[dict]:
    """One row per model: stock / fused / memory_efficient saved MiB and ratios, the goal, per-row
    tables (memory_report) and PNG paths; with cpu_default, the ratio of what the CPU's measured
    choice runs too."""
    rows = []
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).contiguous(
        memory_format=torch.channels_last)
    for arch in archs:
        try:
            factory, source = model_factory(arch)
        except AttributeError:
            rows.append(dict(model=arch, note="not built here (torchvision, or fusedres.models without it, has no such model)"))
            continue
        torch.manual_seed(0)
        model = factory().to(memory_format=torch.channels_last)
        progress(f"  memory: {arch} ({source})")
        lean = fusedres.memory_report(model, x, name=f"{arch} ({source}), batch {batch}, {size}x{size}")
        efficient = fusedres.memory_report(model, x, memory_efficient=True, name=lean.name)
        # on the CPU the default path is the measured choice per block: the saving only where it runs fused
        measured = fusedres.memory_report(model, x, train_path="measure") if cpu_default else None
        row = dict(model=arch, source=source, batch=batch, size=size, stock_mib=lean.stock_bytes / 2**20,
                   fused_mib=lean.fused_bytes / 2**20, ratio=lean.ratio,
                   efficient_mib=efficient.fused_bytes / 2**20, efficient_ratio=efficient.ratio,
                   goal=GOALS.get(arch), efficient_goal=EFFICIENT_GOALS.get(arch),
                   cpu_default_ratio=measured.ratio if measured is not None else None,
                   rows=lean.as_dict()["rows"], efficient_rows=efficient.as_dict()["rows"])
        row["met"] = None if row["goal"] is None else lean.ratio <= row["goal"]
        if out_dir is not None:
            try:
                row["png"] = lean.save_png(os.path.join(out_dir, f"memory_{arch}.png"))
            except ImportError as e:
                row["png"] = f"not drawn: {e}"
        rows.append(row)
        progress(str(lean).splitlines()[-1] + f"   (memory_efficient {efficient.ratio:.3f}x)")
    return rows


def summary_png(rows: List[dict], path: str) -> str:
    """Grouped bars per model: stock, fused and memory_efficient MiB kept for backward (matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "stock_mib" in r]
    labels = [r["model"] for r in rows]
    series = (("stock", "stock_mib"), ("fusedres", "fused_mib"), ("fusedres memory_efficient", "efficient_mib"))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.27
    for k, (name, key) in enumerate(series):
        xs = [i + (k - 1) * width for i in range(len(rows))]
        bars = ax.bar(xs, [r[key] for r in rows], width, label=name)
        if key != "stock_mib":
            ratio = "ratio" if key == "fused_mib" else "efficient_ratio"
            for bar, r in zip(bars, rows):
                ax.annotate(f"{r[ratio]:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("MiB kept for backward")
    first = rows[0] if rows else {}
    ax.set_title(f"Saved for backward after one training forward, batch {first.get('batch')}, "
                 f"{first.get('size')}x{first.get('size')}, float32 (fusedres.memory_report)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _train_step(model, opt, x, labels):
    def step():
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def step_times(archs=TIMED, batch: int = 8, size: int = 112, rounds: int = 8, progress=print) -> List[dict]:
    """On the CPU: median train-step ms of stock, fusedres (default) and fusedres
    memory_efficient=True, interleaved round by round; each variant's share of a round is a few
    steps over rotating inputs."""
    rows = []
    for arch in archs:
        try:
            factory, source = model_factory(arch)
        except AttributeError:
            continue
        torch.manual_seed(0)
        base = factory().to(memory_format=torch.channels_last).train()
        gen = torch.Generator().manual_seed(7)
        xs = [torch.randn(batch, 3, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
              for _ in range(3)]
        labels = [torch.randint(0, 1000, (batch,), generator=gen) for _ in range(3)]
        variants = {f"{source} eager": copy.deepcopy(base), "fusedres": fusedres.fuse(base),
                    "fusedres memory_efficient": fusedres.fuse(base, memory_efficient=True)}
        steps = {}
        for name, m in variants.items():
            opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)
            steps[name] = [_train_step(m, opt, x, y) for x, y in zip(xs, labels)]
            progress(f"  memory: {arch} train batch {batch} {size}x{size}: warming up {name}")
            for step in steps[name]:  # the first calls measure the CPU's per-block choice
                step()
        times: Dict[str, List[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name in variants:
                for step in steps[name]:
                    t0 = time.perf_counter()
                    step()
                    times[name].append((time.perf_counter() - t0) * 1e3)
        stock_ms = statistics.median(times[f"{source} eager"])
        choices = fusedres.cpu_train_choices()
        for name, m in variants.items():
            ms = statistics.median(times[name])
            row = dict(model=arch, impl=name, batch=batch, size=size, ms=ms, vs_stock=ms / stock_ms,
                       threads=torch.get_num_threads())
            if name != f"{source} eager":
                paths = [c.path for c in choices.values()]
                row["cpu_choices"] = f"{paths.count('fused')} fused / {paths.count('stock')} stock (all models so far)"
            rows.append(row)
            progress(f"  memory: {arch} {name}: {ms:.1f} ms ({ms / stock_ms:.3f}x stock)")
    return rows


def run(out_dir: str = None, quick: bool = False, timed: bool = True, progress=print) -> dict:
    """The suite; the CPU-only parts (the measured choice's bytes, step times) where no GPU is."""
    cpu = not torch.cuda.is_available()
    saved = saved_bytes(out_dir=out_dir, cpu_default=cpu, progress=progress)
    chart = None
    if out_dir is not None:
        try:
            chart = summary_png(saved, os.path.join(out_dir, "memory_summary.png"))
        except ImportError as e:
            chart = f"not drawn: {e}"
    times = step_times(rounds=3 if quick else 8, progress=progress) if timed and cpu else []
    return dict(saved=saved, step_times=times, chart=chart)


SAVED_COLUMNS = ("model", "source", "stock_mib", "fused_mib", "ratio", "goal", "met", "efficient_mib",
                 "efficient_ratio", "efficient_goal", "cpu_default_ratio", "note")
TIME_COLUMNS = ("model", "impl", "batch", "size", "ms", "vs_stock", "cpu_choices")


def tables(result: dict) -> str:
    text = table(result["saved"], SAVED_COLUMNS)
    if result["step_times"]:
        text += "\n\n" + table(result["step_times"], TIME_COLUMNS)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                                       datetime.date.today().isoformat()))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    result = run(args.out, args.quick, timed=not args.no_timing)
    result["environment"] = environment()
    print(tables(result))
    path = os.path.join(args.out, "memory.json")
    write_json(path, result)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
