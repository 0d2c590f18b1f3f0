"""Every Triton kernel variant a fused ResNet-50, ResNeXt-50 and DenseNet-121 launch on an H200 (bf16
train step and eval forward; ResNet-50 also in float32, i.e. tf32, and with NCHW weights), compiled for sm_90
with each launch's real specialization (benchmarks/triton_variants.py: recorded under the
interpreter with H200 launch plans, compiled through triton's own binder; no GPU needed).

What the main loops need on Hopper: tensor-core MMA (wgmma where the tile has the 64 rows a
warpgroup multiplies), operand tiles copied into the software pipeline 16 bytes at a time, no
spills, and shared memory that leaves room for two programs per SM.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPT = os.path.join(ROOT, "benchmarks", "triton_variants.py")
TWO_PER_SM = 113 * 1024  # H100/H200: 228 KB of shared memory per SM, 1 KB reserved per program
CONV_KERNELS = ("_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel")


def _tritons():
    """The installed Triton, and the GPU machine's (scripts/test.sh puts triton 3.6 in the folder
    FUSEDRES_GPU_TRITON names): the code a launch gets depends on the compiler's version."""
    found = [pytest.param(None, id="installed-triton")]
    if os.environ.get("FUSEDRES_GPU_TRITON"):
        found.append(pytest.param(os.environ["FUSEDRES_GPU_TRITON"], id="gpu-machine-triton"))
    return found


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia.compiler", reason="triton's CUDA backend compiles for sm_90")
    tmp = tmp_path_factory.mktemp("sm90")
    path = str(tmp / "launches.json")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONSAFEPATH="1")
    subprocess.run([sys.executable, SCRIPT, "record", path, "--models", "resnet50,resnext50_32x4d,densenet121",
                    "--dtypes", "bfloat16,float32"], check=True, env=env, cwd=str(tmp))
    return path


@pytest.fixture(scope="module", params=_tritons())
def variants(request, launches, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sm90-compile")
    env = dict(os.environ, PYTHONSAFEPATH="1")
    env.pop("TRITON_INTERPRET", None)  # the interpreter replaces @triton.jit functions: compile without it
    if request.param:
        assert os.path.isdir(os.path.join(request.param, "triton")), f"no triton in {request.param}"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (request.param, env.get("PYTHONPATH")) if p)
    version = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
    if request.param:
        assert version.startswith("3.6"), f"expected the GPU machine's triton 3.6, got {version}"
    out = subprocess.run([sys.executable, SCRIPT, "compile", launches, "--jobs", str(min(4, os.cpu_count() or 1))],
                         check=True, env=env, cwd=str(tmp), capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    with open(tmp / "variants.jsonl", "w") as f:
        f.write(out)
    return rows


def _describe(row):
    c = row["config"]
    return (f"{row['kernel']} {row['contexts'][0]} "
            + " ".join(f"{k}={c[k]}" for k in ("KH", "GROUPED", "PROLOGUE", "EPILOGUE_BN", "STATS", "BLOCK_M",
                                               "BLOCK_N", "BLOCK_K", "BLOCK_O", "BLOCK_C", "num_warps", "num_stages")
                       if k in c))


def _dtype(row):
    return row["contexts"][0].split()[1]


def test_every_kind_of_launch_was_compiled(variants):
    kinds = {(r["kernel"], _dtype(r)) for r in variants}
    for kernel in CONV_KERNELS:
        assert {(kernel, "bfloat16"), (kernel, "float32")} <= kinds
    assert any(r["config"].get("GROUPED") for r in variants), "ResNeXt's grouped convs"
    assert any("NCHW weights" in " ".join(r["contexts"]) for r in variants)
    assert any(r["config"].get("ACCUMULATE") for r in variants), "DenseNet's accumulating input gradient"
    assert len(variants) > 100, len(variants)


def test_no_kernel_spills(variants):
    spilling = [f"{_describe(r)}: {r['registers']} registers, {r['stack_bytes']} stack bytes"
                for r in variants if r["stack_bytes"]]
    assert not spilling, "\n".join(spilling)


def test_conv_main_loops_use_the_tensor_cores(variants):
    bad = []
    for r in (r for r in variants if r["kernel"] in CONV_KERNELS):
        c = r["config"]
        rows = c["BLOCK_O"] if r["kernel"] == "_conv_wgrad_kernel" else c["BLOCK_M"]
        if rows >= 64 and not r["wgmma"]:
            bad.append(f"{_describe(r)}: no wgmma")
        elif not (r["wgmma"] or r["mma_sync"]):
            bad.append(f"{_describe(r)}: no tensor-core MMA")
    assert not bad, "\n".join(bad)


def _smallest_operand_tile(row) -> int:
    c = row["config"]
    if row["kernel"] == "_conv_wgrad_kernel":
        return c["BLOCK_M"] * min(c["BLOCK_O"], c["BLOCK_C"])
    return c["BLOCK_K"] * min(c["BLOCK_M"], c["BLOCK_N"])


def test_conv_operands_are_copied_16_bytes_at_a_time(variants):
    """Operand tiles go through cp.async 16 bytes at a time and nothing of them through scalar
    loads. Narrower copies are allowed only for
      - the BN prologue's per-channel float32 vectors (a forward with a prologue: 4 bytes);
      - a tile too small to give every thread 16 bytes (ResNeXt's 16x16 grouped weight tiles:
        256 values over 128 threads, 4 bytes each);
      - the tf32 (float32) weight gradient: both its operands have the pixels (its K) strided in
        channels_last, and tf32 wgmma wants K-major tiles. Known, 4-byte copies, until the
        kernel transposes through shared memory (the input gradient's weight is made K-major)."""
    bad = []
    for r in (r for r in variants if r["kernel"] in CONV_KERNELS):
        cp, ld = r["cp_async_bytes"], r["ld_global"]
        if r["kernel"] == "_conv_wgrad_kernel" and _dtype(r) == "float32":
            continue
        if not cp.get("16"):
            bad.append(f"{_describe(r)}: no 16-byte cp.async ({cp})")
        per_thread_16 = r["config"]["num_warps"] * 32 * (8 if _dtype(r) == "bfloat16" else 4)
        narrow_ok = ((r["kernel"] == "_conv_fwd_kernel" and r["config"]["PROLOGUE"])
                     or _smallest_operand_tile(r) < per_thread_16)
        allowed = {"16", "4"} if narrow_ok else {"16"}
        if set(cp) - allowed:
            bad.append(f"{_describe(r)}: cp.async of {sorted(set(cp) - allowed)} bytes ({cp})")
        scalar = {k: v for k, v in ld.items() if k in ("1x16", "1x8")}
        if scalar:
            bad.append(f"{_describe(r)}: scalar loads {scalar}")
    assert not bad, "\n".join(bad)


def test_conv_shared_memory_leaves_room_for_two_programs_per_sm(variants):
    big = [f"{_describe(r)}: {r['shared']} bytes" for r in variants
           if r["kernel"] in CONV_KERNELS and r["shared"] > TWO_PER_SM]
    assert not big, "\n".join(big)


def test_elementwise_kernels_load_16_bytes(variants):
    """The activation passes of the BatchNorm kernels read 16 bytes per thread per load."""
    narrow = [f"{_describe(r)}: {r['ld_global']}" for r in variants
              if r["kernel"] in ("_bn_act_forward_kernel", "_bn_act_backward_elementwise_kernel",
                                 "_bn_act_backward_reduce_kernel")
              and (not r["ld_global"] or any(not k.startswith("4x") for k in r["ld_global"]))]
    assert not narrow, "\n".join(narrow)
