"""CI's zoo sample (issue 32): the smallest model of every torchvision and timm family that has a
BatchNorm (benchmarks/zoo_sample.json, written by `python benchmarks/zoo_sweep.py --write-sample
benchmarks/zoo_sample.json` from the sweep's catalog), each checked as the full sweep checks it
(benchmarks/zoo_sweep.py's check_model, in a process of its own: fuse does not raise, train step
and eval run, float64 equal to stock float64, float32 within 2x stock's own error, bitwise
repeatable, state_dict both ways, unfuse, BN share), at one initialization (seed 0; the sweep runs
three).

Each model's failed checks must be exactly the ones KNOWN lists, with the measured numbers and the
cause where it is known: a new failure fails the test, and so does a known failure that no longer
fails (the list stays true). Collected in scripts/test.sh's second stage (FUSEDRES_ZOO_SAMPLE=1,
where torchvision and timm import; conftest)."""
import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
import zoo_sweep  # noqa: E402

with open(os.path.join(HERE, "..", "benchmarks", "zoo_sample.json")) as _f:
    SAMPLE = json.load(_f)
SEEDS = (0,)

# "source:model" -> (the checks it fails at seed 0, why: the measured numbers)
KNOWN = {
}


def test_the_sample_has_one_model_of_every_family():
    """Every family the installed torchvision and timm define is in the sample or left out with a
    reason (no BatchNorm, over the size limit): a new family is not silently unswept."""
    import timm
    import torchvision
    assert (torchvision.__version__.split("+")[0], timm.__version__) == (
        SAMPLE["versions"]["torchvision"].split("+")[0], SAMPLE["versions"]["timm"]), (
        "benchmarks/zoo_sample.json was written for other versions: write it again (module docstring)")
    listed = {f"{source}:{family}" for source, family in zoo_sweep.model_families()}
    sampled = {f"{e['source']}:{e['family']}" for e in SAMPLE["models"]}
    assert sampled.isdisjoint(SAMPLE["families_left_out"])
    assert listed == sampled | set(SAMPLE["families_left_out"]), (
        f"families not in the sample file: {sorted(listed - sampled - set(SAMPLE['families_left_out']))}; "
        f"in it but gone: {sorted((sampled | set(SAMPLE['families_left_out'])) - listed)}")
    assert set(KNOWN) <= {f"{e['source']}:{e['model']}" for e in SAMPLE["models"]}


@pytest.fixture(scope="module")
def rows():
    """The sample swept once (zoo_sweep.sweep: one process per model, as many at a time as cores)."""
    found = zoo_sweep.sweep(SAMPLE["models"], SEEDS, 96, jobs=max(1, min(2, os.cpu_count() or 1)), timeout=600)
    return {f"{r['source']}:{r['model']}": r for r in found}


@pytest.mark.parametrize("key", [f"{e['source']}:{e['model']}" for e in SAMPLE["models"]])
def test_family_sample_model(rows, key):
    row = rows[key]
    failed = set(row.get("failed", ())) if row["status"] in ("ok", "fail") else {row["status"]}
    expected, why = KNOWN.get(key, (set(), ""))
    detail = {k: row.get(k) for k in ("status", "error", "stage", "float64_worst", "float32_worst", "fuse_warnings")}
    assert failed == set(expected), (f"{key}: fails {sorted(failed)}, known to fail {sorted(expected)} ({why}); "
                                     f"{json.dumps(detail, default=str)[:1500]}")
    if row["status"] in ("ok", "fail"):
        assert row["checks"]["fuse"] and row["checks"]["runs"], detail
