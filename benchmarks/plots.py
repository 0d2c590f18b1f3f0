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


def _series(rows, label, value):
    """(x labels in first-seen order, {impl: [row[value] per label]}) of result rows."""
    labels = list(dict.fromkeys(label(r) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    return labels, {i: [next((r.get(value) for r in rows if label(r) == b and r["impl"] == i), None) for b in labels]
                    for i in impls}


def _run_label(r):
    return f"{r['model']} {r['dtype']} b{r['batch']}"


def plot(report: dict, out: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    device = report.get("environment", {}).get("device", "?")
    written = []

    def save(fig, title, name):
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = os.path.join(out, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def two_panels(rows, left, right, title, name):
        """(value, y label) on the left and on the right, one bar per impl and run."""
        labels, _ = _series(rows, _run_label, left[0])
        fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.7 * len(labels)), 4))
        for ax, (value, ylabel) in zip(axes, (left, right)):
            _bars(ax, *_series(rows, _run_label, value), ylabel)
        save(fig, title, name)

    blocks = [r for r in report.get("blocks", []) if r.get("ms")]
    for dtype in sorted({r["dtype"] for r in blocks}):
        for mode in ("train", "eval"):
            rows = [r for r in blocks if r["dtype"] == dtype and r["mode"] == mode and r["impl"] != "stock eager"]
            if rows:
                labels, series = _series(rows, lambda r: r["block"], "speedup_vs_eager")
                fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(labels)), 4))
                _bars(ax, labels, series, "speedup vs stock eager", reference=1.0)
                save(fig, f"blocks, {mode}, {dtype}, {device}", f"blocks_{mode}_{dtype}.png")
    models = [r for r in report.get("models", []) if r.get("ms")]
    for mode in ("train", "eval"):
        rows = [r for r in models if r["mode"] == mode]
        if rows:
            two_panels(rows, ("images_per_s", "images/s"), ("peak_MB", "peak MB (GPU)"), f"models, {mode}, {device}",
                       f"models_{mode}.png")
    dense = [r for r in report.get("dense", []) if r.get("ms")]
    if dense:
        mem = "peak_MB" if any(r.get("peak_MB") for r in dense) else "saved_MB"
        two_panels(dense, ("ms", "training step ms"), (mem, mem.replace("_", " ")), f"DenseNet training step, {device}",
                   "densenet.png")
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
