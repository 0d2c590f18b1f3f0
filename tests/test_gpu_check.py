"""benchmarks/gpu_check.sh's plumbing, dry run on the CPU: every stage-1 part runs under its own
timeout and leaves its JSON, a part killed at its budget leaves what it wrote and the next part
still runs, and the summary and exit code say so. (The GPU answers come from a lent GPU.)"""
import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_stage1_dry_run_with_a_part_killed_at_its_budget(tmp_path):
    """The convs part is killed 3 s in, wherever it is (on a loaded machine, before Python has even
    imported torch: the record gpu_check.sh wrote first is what it leaves); the other parts get
    budgets no machine runs out of, so nothing here depends on the machine's speed."""
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable, BUDGET_convs="3",
               BUDGET_kernels="3000", BUDGET_bottleneck="3000", BUDGET_resnet50="3000", BUDGET_memory="3000")
    env.pop("TRITON_INTERPRET", None)  # the script sets it for its dry run
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=4 * 3000)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # the killed part fails the run
    summary = json.loads((tmp_path / "stage1_summary.json").read_text())
    parts = {p["part"]: p for p in summary["parts"]}
    assert list(parts) == ["environment", "build", "kernels", "convs", "bottleneck", "resnet50", "memory"]
    assert not summary["ok"]
    assert parts["convs"]["timed_out"] and parts["convs"]["rc"] == 124, parts["convs"]
    assert parts["convs"]["seconds"] < 60  # timeout -k 5 3: TERM at 3 s, KILL at 8 s
    killed = json.loads((tmp_path / "stage1_convs.json").read_text())
    assert killed["finished"] is False and killed["dry_run"] is True

    for name in ("kernels", "bottleneck", "resnet50", "memory"):
        assert parts[name]["rc"] == 0 and not parts[name]["timed_out"], (name, proc.stdout[-3000:])
        data = json.loads((tmp_path / f"stage1_{name}.json").read_text())
        assert data["finished"] is True and data["dry_run"] is True and data["rows"], name
    kernels = json.loads((tmp_path / "stage1_kernels.json").read_text())
    # no GPU here: every GPU test skipped with its reason, none failed, and the files were found
    assert kernels["counts"]["failed"] == 0 and kernels["counts"]["skipped"] >= 10, kernels["counts"]
    bottleneck = json.loads((tmp_path / "stage1_bottleneck.json").read_text())
    assert {r["impl"] for r in bottleneck["rows"]} == {"eager", "fusedres"} and bottleneck["errors_ok"]
    resnet = json.loads((tmp_path / "stage1_resnet50.json").read_text())
    assert {(r["mode"], r["impl"]) for r in resnet["rows"]} == {(m, i) for m in ("inference", "train step")
                                                                for i in ("eager", "fusedres")}
