"""Test configuration. Must run before triton is first imported:
- no GPU: Triton kernels run on CPU tensors under the interpreter (TRITON_INTERPRET=1);
- FUSEDRES_POISON_OUTPUTS=1: every kernel's outputs start as NaN, so an unwritten element fails;
- FUSEDRES_AUTOTUNE=0: no autotuning inside tests;
- FUSEDRES_CPU_TRAIN_PATH=fused: CPU training always runs the fused units (not the measured
  choice, which may pick the stock forward);
- FUSEDRES_STRICT=1: a backend a test asks for that cannot run the call raises instead of falling
  back to the reference path (which would pass as a false green); tests of the fallback itself
  opt out visibly with the `lenient` fixture;
- tests marked needs_cuda skip, with the reason, where no GPU is present (the only skips);
- tests/test_real_models.py is collected only where torchvision and timm import (scripts/test.sh
  runs it in its second stage, in an environment that has them); FUSEDRES_REAL_MODELS=1 makes
  their absence an error instead;
- tests/test_zoo_sample.py (the zoo sweep's family sample) only with FUSEDRES_ZOO_SAMPLE=1 as
  well (scripts/test.sh's second stage)."""
import importlib.util
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FUSEDRES_POISON_OUTPUTS"] = "1"
os.environ["FUSEDRES_AUTOTUNE"] = "0"  # tests run the fixed default conv configurations, never tune
os.environ["FUSEDRES_STRICT"] = "1"  # no silent fallback to the reference path (test_errors checks it)
# the fused units in CPU training, always: "measure" (the default) could pick the stock forward and
# a test comparing fused with stock would compare stock with itself (tests/test_cpu_paths.py
# tests the measured choice)
os.environ["FUSEDRES_CPU_TRAIN_PATH"] = "fused"

import pytest  # noqa: E402

REAL_MODELS = all(importlib.util.find_spec(m) is not None for m in ("torchvision", "timm"))
if os.environ.get("FUSEDRES_REAL_MODELS") == "1" and not REAL_MODELS:
    raise RuntimeError("FUSEDRES_REAL_MODELS=1 but torchvision or timm does not import here")
collect_ignore = [] if REAL_MODELS else ["test_real_models.py"]
# CI's zoo sample (~70 models, minutes): scripts/test.sh's second stage asks for it
if not (REAL_MODELS and os.environ.get("FUSEDRES_ZOO_SAMPLE") == "1"):
    collect_ignore.append("test_zoo_sample.py")


def pytest_report_header(config):
    return ("real torchvision / timm model tests: "
            + ("collected" if REAL_MODELS else "not collected here (no torchvision / timm); "
               "scripts/test.sh runs them in its second stage"))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present on this machine")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def lenient(monkeypatch):
    """Opts a test out of FUSEDRES_STRICT: for tests of the fallback to the reference path itself
    (its warning, its result). The registry reads the variable on every resolve and keys its
    kernel cache on it, so the change takes effect at once; monkeypatch restores it after."""
    monkeypatch.setenv("FUSEDRES_STRICT", "0")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _exact_float32():
    """tf32 off (a GPU's default for convs, in cuDNN and in the fused conv kernels alike), so
    float32 results are checked at float32's tolerance; tests of tf32 turn it on themselves."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous
