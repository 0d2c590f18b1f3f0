"""The end-to-end benchmark's pieces: the generated data set, the augmentation, a tiny run."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import e2e_train  # noqa: E402


def test_synthetic_data_is_deterministic_balanced_and_held_out_has_both_classes():
    data = e2e_train.SyntheticTwoClass(40, 20)
    a, la = data.item(7)
    b, lb = data.item(7)
    assert torch.equal(a, b) and la == lb == 1 and a.shape == (3, 20, 20)
    assert 0 <= a.min() and a.max() <= 1
    labels = [data.item(i)[1] for i in range(40)]
    assert labels.count(0) == labels.count(1) == 20


def test_random_resized_crop_flip_shape_and_determinism():
    img = torch.rand(3, 30, 40)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    c1, c2 = e2e_train.random_resized_crop_flip(img, 16, g1), e2e_train.random_resized_crop_flip(img, 16, g2)
    assert c1.shape == (3, 16, 16) and torch.equal(c1, c2)


def test_tiny_end_to_end_run_writes_predictions(tmp_path):
    args = e2e_train.parser(False).parse_args(["--arch", "resnet18", "--steps", "3", "--batch", "4", "--size", "32",
                                               "--images", "20", "--out", str(tmp_path)])
    result = e2e_train.run(args, torch.device("cpu"))
    assert result["fused_blocks"] == 9  # 8 basic blocks and the model's own forward (its stem unit)
    assert len(result["stock"]["losses"]) == len(result["fusedres"]["losses"]) == len(
        result["stock_float64"]["losses"]) == 3
    first = [result[k]["losses"][0] for k in ("stock", "fusedres", "stock_float64")]
    assert max(first) - min(first) < 1e-4, f"same weights, same batch: {first}"
    assert set(result["max_abs_loss_gap_to_float64"]) == {"stock", "fusedres"}
    lines = open(result["predictions_csv"]).read().splitlines()
    assert lines[0] == "id,p_dog" and len(lines) == 1 + result["held_out"]


import headline  # noqa: E402


def _model(model, mode, impl, ips, peak=None):
    return dict(model=model, mode=mode, impl=impl, dtype="bfloat16", batch=256, ms=256 / ips * 1e3,
                images_per_s=ips, peak_MB=peak)


def test_headline_figures_against_targets(tmp_path):
    report = dict(environment=dict(device="NVIDIA H100", torch="2.11", triton="3.6", cuda="13.0", date="2026-11-22"),
                  command="bash benchmarks/gpu_check.sh", models=[
                      _model("resnet50", "train", "torchvision eager", 1000, 40000),
                      _model("resnet50", "train", "torchvision torch.compile(max-autotune)", 1300),
                      _model("resnet50", "train", "fusedres", 1600, 20000),
                      _model("resnet50", "eval", "torchvision eager", 3000),
                      _model("resnet50", "eval", "fusedres", 3600),
                      _model("resnext50_32x4d", "train", "fusedres", 1200)],
                  dense=[dict(model="densenet121", impl="fusedres", dtype="bfloat16", batch=256, ms=1.0,
                              time_vs_stock=0.95, memory_vs_memory_efficient=0.8)])
    rows = {r["figure"]: r for r in headline.headline_rows(report)}
    train = rows["ResNet-50 training images/s vs stock eager"]
    assert abs(train["measured"] - 1.6) < 1e-9 and train["met"] is True
    compiled = rows["ResNet-50 training images/s vs stock torchvision torch.compile(max-autotune)"]
    assert abs(compiled["measured"] - 1600 / 1300) < 1e-9 and compiled["met"] is True
    assert rows["ResNet-50 inference images/s vs stock eager"]["met"] is False  # 1.2x < 1.3x
    assert rows["ResNet-50 inference images/s vs stock torch.compile"]["measured"] is None  # not in this result
    assert rows["ResNet-50 training peak memory vs stock eager"]["met"] is True  # 0.5x
    assert rows["resnext50_32x4d training images/s vs resnet50's (both fused)"]["met"] is False  # 0.75x
    assert rows["DenseNet-121 batch 256 step time vs memory_efficient=False"]["met"] is False
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{headline.START}\nold\n{headline.END}\nrest\n")
    path = tmp_path / "report_cuda_x.json"
    headline.update_readme(str(readme), headline.render(report, str(path)))
    text = readme.read_text()
    assert "old" not in text and "| ResNet-50 training images/s vs stock eager | 1.60x | >= 1.5x | yes |" in text
    assert "| ResNet-50 inference images/s vs stock eager | 1.20x | >= 1.3x | **no** |" in text
    assert text.startswith("intro\n") and text.endswith("rest\n")


def test_cpu_models_suite_runs_every_variant_side_by_side():
    """The CPU models suite's plumbing at a toy size (ResNet-50, eval 32x32, train batch 4 at
    64x64, one round, no compile): a row per variant and mode, timed or with a note saying why
    not, ratios against stock eager from the same run, and fused / ONNX Runtime outputs that match
    stock's. (Not smaller for training: batch 2 at 32x32 leaves layer4's BatchNorm two values per
    channel, whose normalization amplifies rounding ~1e8-fold, stock's and fused's alike.)"""
    import bench_models

    out = bench_models.run_cpu(("resnet50",), eval_batches=(1,), train_batch=4, eval_size=32, train_size=64,
                               quick=True, compile_variants=False, rounds=1, n_inputs=2, progress=lambda m: None)
    rows = out["rows"]
    assert {(r["mode"], r["impl"].split(" (")[0]) for r in rows} >= {("eval", "fusedres"), ("train", "fusedres")}
    for r in rows:
        assert (r.get("ms") is not None) != bool(r.get("note")), r  # timed, or says why not
        if r.get("ms") is not None:
            assert r["speedup_vs_eager"] > 0
            if r.get("max_abs_diff") is not None:
                assert r["max_abs_diff"] <= 1e-3 * max(1.0, r["ref_max_abs"]), r
    ort = [r for r in rows if r["impl"].startswith("onnxruntime") and r["mode"] == "eval"]
    assert len(ort) == 1
    assert out["info"]["fusedres_backends"]["onednn"]["cpu"] is True  # CI's torch has oneDNN's conv ops
    assert out["info"]["environment"]["date"]


def test_memory_suite_rows_and_interleaved_step_times(tmp_path):
    """The memory suite's plumbing at a toy size: a row per model with stock / fused /
    memory_efficient bytes (fused < stock, memory_efficient <= fused), the goal where the issue
    set one, a row saying why for a model this environment cannot build; step times of the three
    variants from one interleaved run."""
    import bench_memory

    rows = bench_memory.saved_bytes(("resnet50", "no_such_model"), batch=2, size=48, out_dir=str(tmp_path),
                                    cpu_default=True, progress=lambda m: None)
    resnet, missing = rows
    assert resnet["goal"] == 0.85 and resnet["efficient_goal"] == 0.55
    assert 0 < resnet["efficient_mib"] <= resnet["fused_mib"] < resnet["stock_mib"]
    assert resnet["ratio"] == resnet["fused_mib"] / resnet["stock_mib"]
    assert 0 < resnet["cpu_default_ratio"] <= 1.0 + 1e-6
    assert [r["path"] for r in resnet["rows"]][-1] == "(rest)"
    assert "note" in missing and "stock_mib" not in missing
    times = bench_memory.step_times(("resnet18",), batch=2, size=48, rounds=1, progress=lambda m: None)
    assert [r["impl"] for r in times][1:] == ["fusedres", "fusedres memory_efficient"]
    assert times[0]["vs_stock"] == 1.0 and all(r["ms"] > 0 for r in times)
    assert "eager" in bench_memory.tables(dict(saved=rows, step_times=times))
