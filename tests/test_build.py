"""The extension: it is built and loaded, import works without it, and every .cu file compiles
with nvcc for sm_80 and sm_90 against torch's headers (also on machines without a GPU)."""
import concurrent.futures
import inspect
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

import fusedres

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def test_extension_is_loaded_and_has_cpu_kernels():
    assert fusedres.extension_loaded(), fusedres._extension.LOAD_ERROR
    table = fusedres.backends()
    assert table["cpu"]["cpu"] is True and table["reference"]["cpu"] is True
    assert table["selected"] in ("auto", "reference", "cpu", "cuda", "triton")


def test_cuda_kernels_registered_when_built_with_cuda():
    built = bool(torch.ops.fusedres_kernels.built_with_cuda())
    assert built == (torch.version.cuda is not None and os.environ.get("FUSEDRES_SKIP_CUDA_BUILD") != "1"
                     and cpp_extension.CUDA_HOME is not None)


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


def _nvcc():
    home = cpp_extension.CUDA_HOME or "/usr/local/cuda"
    path = pathlib.Path(home) / "bin" / "nvcc"
    return str(path) if path.exists() else shutil.which("nvcc")


def _compile(source: pathlib.Path, tmp: pathlib.Path):
    include = pathlib.Path(torch.utils.cpp_extension.include_paths()[0])
    # The standard torch's own extension builder passes (C++20 from torch 2.10 on, C++17 before).
    flags = ["-std=c++20" if "c++20" in inspect.getsource(cpp_extension) else "-std=c++17"]
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    if not (include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        includes.insert(0, f"-I{ROOT / 'tests' / 'cuda_stub'}")  # the CPU wheel lacks this one header
    cmd = [_nvcc(), "-c", str(source), "-o", str(tmp / (source.stem + ".o")), *flags, "-O1", "-Xcompiler", "-fPIC",
           "-DFUSEDRES_WITH_CUDA", "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           *includes]
    return source.name, subprocess.run(cmd, capture_output=True, text=True)


@pytest.mark.skipif(_nvcc() is None, reason="nvcc is not installed: the CUDA compile check needs it")
def test_every_cuda_source_compiles_for_sm80_and_sm90(tmp_path):
    assert CUDA_SOURCES, "no .cu files found"
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda s: _compile(s, tmp_path), CUDA_SOURCES))
    failures = {name: r.stderr[-3000:] for name, r in results if r.returncode != 0}
    assert not failures, failures


def test_triton_conv_kernels_compile_for_sm90_with_mma_and_pipelined_loads():
    """Without a GPU: the conv kernels compile for H100 (sm_90) as a channels_last ResNet conv
    launches them, with Hopper tensor-core MMA (wgmma; mma.sync for 16-row tiles) and cp.async-pipelined loads in every
    variant (an unvectorizable load, e.g. a grouped weight read at a group offset, silently turns
    pipelining off)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_sm90_compile.py")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 10, proc.stdout
    for r in rows:
        # 16-row tiles are below wgmma's 64: those use mma.sync, still tensor cores
        assert r["wgmma"] > 0 or "16x16" in r["variant"], f"{r['kernel']} ({r['variant']}): no wgmma"
        assert r["cp_async"] > 0, f"{r['kernel']} ({r['variant']}): loads not pipelined"
        assert r["shared"] >= 2 * r["stage_bytes"], f"{r['kernel']} ({r['variant']}): fewer than 2 stages: {r}"
