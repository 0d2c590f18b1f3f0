"""The Triton kernels' host-side plans: 64-bit offsets where the grid passes int32, pipeline depth
within the shared-memory budget, weight forms cached per weight version, and the autotuner's
handling of failing candidates and of CUDA graph capture. (What the compiler makes of the plans:
tests/test_sm90_compile.py.)"""
import pytest
import torch

pytest.importorskip("triton")

from fusedres.kernels import bn_act_triton, conv_triton as ct  # noqa: E402


def test_int64_offsets_exactly_where_the_last_block_passes_int32():
    int32_max = 2**31 - 1
    assert not bn_act_triton.needs_int64_offsets(2**31, 1024)  # last offset 2^31 - 1 fits
    assert bn_act_triton.needs_int64_offsets(2**31 + 1, 1024)
    # a block that does not divide 2^31: the grid's last offsets pass int32 before numel does
    assert bn_act_triton.needs_int64_offsets(int32_max - 100, 3000)
    assert not bn_act_triton.needs_int64_offsets(int32_max - 3000, 3000)


@pytest.mark.parametrize("stages, stage_bytes, expected", [(3, 32 * 1024, 3), (3, 64 * 1024, 2), (4, 48 * 1024, 2),
                                                           (1, 64 * 1024, 1)])
def test_pipeline_stages_fit_the_shared_memory_budget(stages, stage_bytes, expected):
    assert ct._fit_stages(stages, stage_bytes) == expected


def test_weight_gradient_steps_fit_shared_memory_and_registers():
    # bf16 128x128 tiles in 3 stages: 128-pixel steps would take 192 KB
    step = ct._wgrad_pixel_step(3, 256, 2, 128, 8, prologue=False)
    assert step == 64 and 3 * step * 256 * 2 <= ct.PIPELINE_BYTES
    # DenseNet's 32x64 tiles on 4 warps with the BN prologue: at most 32 input values per thread
    assert ct._wgrad_pixel_step(4, 96, 2, 64, 4, prologue=True) == 64
    assert ct._wgrad_pixel_step(4, 96, 2, 64, 4, prologue=False) == 128


def test_grouped_weight_tiles_are_built_once_per_weight_version():
    geo = ct.geometry((2, 16, 5, 5), (16, 4, 3, 3), (1, 1), (1, 1), (1, 1), 4)
    weight = torch.randn(16, 4, 3, 3)
    first, span = ct.cached_grouped_weight_tiles(weight, geo, 16, 16, dgrad=False)
    again, _ = ct.cached_grouped_weight_tiles(weight, geo, 16, 16, dgrad=False)
    assert again is first
    fresh, fresh_span = ct.grouped_weight_tiles(weight, geo, 16, 16, dgrad=False)
    assert torch.equal(first, fresh) and span == fresh_span
    other, _ = ct.cached_grouped_weight_tiles(weight, geo, 16, 16, dgrad=True)
    assert other is not first  # another form of the same weight
    with torch.no_grad():
        weight.mul_(2)  # an optimizer step: the version counter moves
    updated, _ = ct.cached_grouped_weight_tiles(weight, geo, 16, 16, dgrad=False)
    assert updated is not first and torch.equal(updated, 2 * first)
    with torch.inference_mode():
        frozen = torch.randn(16, 4, 3, 3)  # no version counter: built every call, never cached
    a, _ = ct.cached_grouped_weight_tiles(frozen, geo, 16, 16, dgrad=False)
    b, _ = ct.cached_grouped_weight_tiles(frozen, geo, 16, 16, dgrad=False)
    assert a is not b and torch.equal(a, b)


@pytest.fixture
def tuning(monkeypatch):
    """_choose with autotuning on and do_bench replaced by one call of the candidate."""
    import triton.testing

    monkeypatch.setattr(ct, "autotune_enabled", lambda device: True)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 1.0)[1])
    monkeypatch.setattr(ct, "_tuned", {})


def test_autotuner_skips_only_candidates_out_of_resources(tuning):
    from triton.runtime.errors import OutOfResources

    def run(cfg):
        if cfg == "too big":
            raise OutOfResources(300000, 232448, "shared memory")

    assert ct._choose(("k", 1), torch.device("cpu"), ["too big", "fits"], "default", run) == "fits"

    def broken(cfg):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):  # sticky errors are not swallowed
        ct._choose(("k", 2), torch.device("cpu"), ["a", "b"], "default", broken)


def test_autotuner_never_times_while_a_cuda_graph_is_captured(tuning, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)

    def run(cfg):
        raise AssertionError("timed inside a capture")

    assert ct._choose(("k", 3), torch.device("cuda"), ["a"], "default", run) == "default"
    assert ("k", 3) not in ct.tuned_configs()  # the next eager call still tunes it


def test_float32_convs_follow_cudnns_tf32_switch(monkeypatch):
    """tf32 on CUDA where cuDNN would use it (its default), exact float32 where it would not; the
    numerics of both paths are checked on a GPU (tests/test_gpu_kernels.py), the tf32 kernels'
    sm_90 code in tests/test_sm90_compile.py."""
    monkeypatch.setattr(ct, "triton_interpreted", lambda: False)
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert ct._dot_flags(torch.float32, cuda)[2] == "tf32"
    assert ct._dot_flags(torch.float32, torch.device("cpu"))[2] == "ieee"
    assert ct._dot_flags(torch.bfloat16, cuda)[2] is None
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert ct._dot_flags(torch.float32, cuda)[2] == "ieee"
