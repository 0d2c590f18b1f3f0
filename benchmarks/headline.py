"""The README's headline table, generated from the newest committed GPU result.

    python benchmarks/headline.py [--results benchmarks/results] [--readme README.md]

Reads the newest benchmarks/results/**/report_cuda_*.json, computes the headline figures against
their targets (bf16, channels_last, batch 256, as the benchmark issue sets them) and writes the
table between the README's `<!-- headline:start -->` and `<!-- headline:end -->` markers, with
the device, versions, date and the command that produced the result. Every figure is as
measured; a missed target says so. With no GPU result committed it says that instead.
"""
import argparse
import glob
import json
import os
import sys
from typing import List, Optional

START, END = "<!-- headline:start -->", "<!-- headline:end -->"


def newest_gpu_result(results_dir: str) -> Optional[str]:
    paths = glob.glob(os.path.join(results_dir, "**", "report_cuda_*.json"), recursive=True)
    return max(paths, key=lambda p: os.path.basename(p)) if paths else None


def _model_row(rows, model, mode, impl_pred, dtype="bfloat16", batch=256):
    for r in rows:
        if (r.get("model") == model and r.get("mode") == mode and r.get("dtype") == dtype and r.get("batch") == batch
                and r.get("ms") and impl_pred(r["impl"])):
            return r
    return None


def _eager(impl):
    return impl.endswith(" eager")


def _fused(impl):
    return impl == "fusedres"


def _stock_compiled(impl):
    return "torch.compile" in impl and not impl.startswith("fusedres")


def headline_rows(report: dict) -> List[dict]:
    """(figure, measured, target, met) rows; measured None where the result lacks the figure."""
    models = report.get("models", [])
    out = []

    def ratio(num, den, key):
        return num[key] / den[key] if num and den and num.get(key) and den.get(key) else None

    for mode, eager_target, compile_target in (("train", 1.5, 1.2), ("eval", 1.3, 1.1)):
        fused = _model_row(models, "resnet50", mode, _fused)
        eager = _model_row(models, "resnet50", mode, _eager)
        compiled = _model_row(models, "resnet50", mode, _stock_compiled)
        what = "training" if mode == "train" else "inference"
        out.append(dict(figure=f"ResNet-50 {what} images/s vs stock eager",
                        measured=ratio(fused, eager, "images_per_s"), target=f">= {eager_target}x",
                        ok=lambda v, t=eager_target: v >= t))
        out.append(dict(figure=f"ResNet-50 {what} images/s vs stock {compiled['impl'] if compiled else 'torch.compile'}",
                        measured=ratio(fused, compiled, "images_per_s"), target=f">= {compile_target}x",
                        ok=lambda v, t=compile_target: v >= t))
    fused = _model_row(models, "resnet50", "train", _fused)
    eager = _model_row(models, "resnet50", "train", _eager)
    out.append(dict(figure="ResNet-50 training peak memory vs stock eager", measured=ratio(fused, eager, "peak_MB"),
                    target="<= 0.6x", ok=lambda v: v <= 0.6))
    rx = _model_row(models, "resnext50_32x4d", "train", _fused)
    out.append(dict(figure="resnext50_32x4d training images/s vs resnet50's (both fused)",
                    measured=ratio(rx, fused, "images_per_s"), target=">= 0.85x", ok=lambda v: v >= 0.85))
    dense = report.get("dense", [])
    for batch in sorted({r.get("batch") for r in dense if r.get("model") == "densenet121"}):
        row = next((r for r in dense if r.get("model") == "densenet121" and r.get("impl") == "fusedres"
                    and r.get("dtype") == "bfloat16" and r.get("batch") == batch and r.get("ms")), None)
        out.append(dict(figure=f"DenseNet-121 batch {batch} step time vs memory_efficient=False",
                        measured=row.get("time_vs_stock") if row else None, target="<= 0.9x", ok=lambda v: v <= 0.9))
        out.append(dict(figure=f"DenseNet-121 batch {batch} peak memory vs memory_efficient=True",
                        measured=row.get("memory_vs_memory_efficient") if row else None, target="<= 1.0x",
                        ok=lambda v: v <= 1.0))
    for r in out:
        r["met"] = None if r["measured"] is None else bool(r.pop("ok")(r["measured"]))
        r.pop("ok", None)
    return out


def render(report: Optional[dict], path: Optional[str]) -> str:
    if report is None:
        return ("No GPU result is committed yet, so there is no headline figure: run `bash benchmarks/gpu_check.sh` "
                "on a GPU machine, commit its `report_cuda_*.json` under `benchmarks/results/`, then "
                "`python benchmarks/headline.py`.")
    env = report.get("environment", {})
    lines = [f"Measured on {env.get('device')} (torch {env.get('torch')}, triton {env.get('triton')}, CUDA "
             f"{env.get('cuda')}), {env.get('date')}; bf16 autocast, channels_last, batch 256. From "
             f"`{os.path.relpath(path)}`, made by `{report.get('command', '?')}`.", "",
             "| figure | measured | target | met |", "| --- | --- | --- | --- |"]
    for r in headline_rows(report):
        measured = "not measured" if r["measured"] is None else f"{r['measured']:.2f}x"
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['figure']} | {measured} | {r['target']} | {met} |")
    return "\n".join(lines)


def update_readme(readme: str, text: str) -> None:
    with open(readme) as f:
        content = f.read()
    if START not in content or END not in content:
        raise SystemExit(f"headline: {readme} lacks the {START} / {END} markers")
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(f"{head}{START}\n{text}\n{END}{tail}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=os.path.join("benchmarks", "results"))
    p.add_argument("--readme", default="README.md")
    args = p.parse_args(argv)
    path = newest_gpu_result(args.results)
    report = None
    if path:
        with open(path) as f:
            report = json.load(f)
    text = render(report, path)
    update_readme(args.readme, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
