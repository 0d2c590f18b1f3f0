"""PNG plots of a report JSON: speedup per block, time and memory per model, DenseNet memory.

    python benchmarks/plots.py REPORT.json [--out DIR]

Needs matplotlib; report.py calls it at the end of a run when matplotlib imports and says so
when it does not (the JSON has every figure either way). The end-to-end loss overlay is drawn by
e2e_train.py.
"""
import argparse
import json
import os
import sys
from typing import Dict, List


def _bars(ax, labels: List[str], series: Dict[str, List[float]], ylabel: str, reference: float = None):
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [v if v is not None else 0 for v in values], width, label=name)
    if reference is not None:
        ax.axhline(reference, color="k", linewidth=0.8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def plot(report: dict, out: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    device = report.get("environment", {}).get("device", "?")
    written = []
    blocks = [r for r in report.get("blocks", []) if r.get("ms")]
    for dtype in sorted({r["dtype"] for r in blocks}):
        for mode in ("train", "eval"):
            rows = [r for r in blocks if r["dtype"] == dtype and r["mode"] == mode and r["impl"] != "stock eager"]
            if not rows:
                continue
            labels = list(dict.fromkeys(r["block"] for r in rows))
            impls = list(dict.fromkeys(r["impl"] for r in rows))
            series = {i: [next((r["speedup_vs_eager"] for r in rows if r["block"] == b and r["impl"] == i), None)
                          for b in labels] for i in impls}
            fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(labels)), 4))
            _bars(ax, labels, series, "speedup vs stock eager", reference=1.0)
            ax.set_title(f"blocks, {mode}, {dtype}, {device}", fontsize=9)
            fig.tight_layout()
            path = os.path.join(out, f"blocks_{mode}_{dtype}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    models = [r for r in report.get("models", []) if r.get("ms")]
    for mode in ("train", "eval"):
        rows = [r for r in models if r["mode"] == mode]
        if not rows:
            continue
        labels = list(dict.fromkeys(f"{r['model']} {r['dtype']} b{r['batch']}" for r in rows))
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        key = lambda r: f"{r['model']} {r['dtype']} b{r['batch']}"  # noqa: E731
        fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.7 * len(labels)), 4))
        _bars(axes[0], labels, {i: [next((r["images_per_s"] for r in rows if key(r) == b and r["impl"] == i), None)
                                    for b in labels] for i in impls}, "images/s")
        _bars(axes[1], labels, {i: [next((r.get("peak_MB") for r in rows if key(r) == b and r["impl"] == i), None)
                                    for b in labels] for i in impls}, "peak MB (GPU)")
        fig.suptitle(f"models, {mode}, {device}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out, f"models_{mode}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    dense = [r for r in report.get("dense", []) if r.get("ms")]
    if dense:
        labels = list(dict.fromkeys(f"{r['model']} {r['dtype']} b{r['batch']}" for r in dense))
        impls = list(dict.fromkeys(r["impl"] for r in dense))
        key = lambda r: f"{r['model']} {r['dtype']} b{r['batch']}"  # noqa: E731
        mem = "peak_MB" if any(r.get("peak_MB") for r in dense) else "saved_MB"
        fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.7 * len(labels)), 4))
        _bars(axes[0], labels, {i: [next((r["ms"] for r in dense if key(r) == b and r["impl"] == i), None)
                                    for b in labels] for i in impls}, "training step ms")
        _bars(axes[1], labels, {i: [next((r.get(mem) for r in dense if key(r) == b and r["impl"] == i), None)
                                    for b in labels] for i in impls}, mem.replace("_", " "))
        fig.suptitle(f"DenseNet training step, {device}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out, "densenet.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report")
    p.add_argument("--out", default=None, help="default: the report's folder")
    args = p.parse_args(argv)
    with open(args.report) as f:
        report = json.load(f)
    for path in plot(report, args.out or os.path.dirname(os.path.abspath(args.report))):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
