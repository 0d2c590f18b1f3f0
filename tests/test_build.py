"""The extension: it is built and loaded (with its CUDA kernels wherever a CUDA torch and nvcc
are present: scripts/test.sh's second stage builds them for sm_80 and sm_90 on this CPU machine),
and import works without it. (The Triton kernels' sm_90 compile: tests/test_sm90_compile.py.)"""
import os
import pathlib
import subprocess
import sys

import torch
import torch.utils.cpp_extension as cpp_extension

import fusedres

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_extension_is_loaded_and_has_cpu_kernels():
    assert fusedres.extension_loaded(), fusedres._extension.LOAD_ERROR
    table = fusedres.backends()
    assert table["cpu"]["cpu"] is True and table["reference"]["cpu"] is True
    assert table["selected"] in ("auto", "reference", "cpu", "cuda", "triton")


KERNEL_OPS = ("bn_stats", "bn_act_forward", "bn_act_backward_reduce", "bn_act_backward_elementwise")


def test_cuda_kernels_registered_when_built_with_cuda():
    """A CUDA torch with nvcc present builds the CUDA kernels (scripts/test.sh's real-model stage
    builds them with torch 2.15.0 + CUDA 13.2 (nvcc 13.0) on this CPU machine), and then every op has a CUDA
    implementation registered with the dispatcher, whether or not a GPU is present."""
    built = bool(torch.ops.fusedres_kernels.built_with_cuda())
    assert built == (torch.version.cuda is not None and os.environ.get("FUSEDRES_SKIP_CUDA_BUILD") != "1"
                     and cpp_extension.CUDA_HOME is not None)
    for op in KERNEL_OPS:
        for key, expected in (("CPU", True), ("CUDA", built)):
            has = torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedres_kernels::{op}", key)
            assert has == expected, f"fusedres_kernels::{op}: {key} kernel registered {has}, expected {expected}"


def test_import_without_extension_reports_why():
    code = ("import sys; sys.modules['fusedres._C'] = None\n"
            "import fusedres, torch\n"
            "t = fusedres.backends()\n"
            "assert not fusedres.extension_loaded()\n"
            "assert 'did not load' in t['cpu']['cpu'], t\n"
            "import warnings; warnings.simplefilter('ignore')\n"
            "x = torch.randn(2, 3, 4, 4)\n"
            "m, s = fusedres.ops.bn_stats(x)\n"
            "assert torch.allclose(m, x.mean((0, 2, 3)), atol=1e-5)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
