"""Synchronized BatchNorm under DistributedDataParallel (gloo, 2 processes on the CPU): a 2-rank
run over an unevenly split batch matches a 1-process run of the stock model over the whole batch
(outputs, input and parameter gradients, running statistics) over several SGD steps."""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import fusedres
from helpers import SmallResNet, assert_close_scaled, randomize_bn

STEPS = 3
BATCH = 5
SPLIT = (3, 2)  # uneven per-rank batches
LR = 0.1


def _inputs(fmt):
    g = torch.Generator().manual_seed(1)
    xs = [(torch.randn(BATCH, 3, 5, 5, generator=g) + 0.5).contiguous(memory_format=fmt) for _ in range(STEPS)]
    weights = [torch.randn(BATCH, 16, 3, 3, generator=g) for _ in range(STEPS)]
    return xs, weights


def _model():
    torch.manual_seed(0)
    return randomize_bn(SmallResNet())


def _run_reference(fmt):
    """The stock model, one process, the whole batch: loss = sum(y * w) / N."""
    model = _model().to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    xs, weights = _inputs(fmt)
    record = []
    for x, w in zip(xs, weights):
        x = x.clone().requires_grad_()
        y = model(x)
        (y * w).sum().div(BATCH).backward()
        record.append(dict(y=y.detach(), x_grad=x.grad, grads={n: p.grad.clone() for n, p in model.named_parameters()}))
        opt.step()
        opt.zero_grad()
    return record, {n: b.clone() for n, b in model.named_buffers()}


def _worker(rank, world, port, backend, fmt_name, out_dir):
    os.environ["FUSEDRES_BACKEND"] = backend
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fmt = getattr(torch, fmt_name)
        model = fusedres.fuse(_model(), sync_bn=True).to(memory_format=fmt)
        assert len(fusedres.fuse_report(model).swapped) == 3  # two blocks and the stem's unit
        assert isinstance(model.stem, fusedres.FusedSequential)  # its unit synchronizes the statistics
        assert isinstance(model.stem[1], fusedres.SyncBatchNorm2d)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        lo = sum(SPLIT[:rank])
        rows = slice(lo, lo + SPLIT[rank])
        xs, weights = _inputs(fmt)
        record = []
        for x, w in zip(xs, weights):
            x = x[rows].clone().requires_grad_()
            y = ddp(x)
            # DDP averages gradients over ranks: sum(y_r * w_r) * world / N averages to the
            # reference's sum(y * w) / N
            (y * w[rows]).sum().mul(world / BATCH).backward()
            record.append(dict(y=y.detach(), x_grad=x.grad / world,
                               grads={n: p.grad.clone() for n, p in model.named_parameters()}))
            opt.step()
            opt.zero_grad()
        torch.save((record, {n: b.clone() for n, b in model.named_buffers()}), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DIST_BACKENDS = ["cpu"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built into this torch")
@pytest.mark.parametrize("backend", DIST_BACKENDS)
@pytest.mark.parametrize("fmt_name", ["contiguous_format", "channels_last"])
def test_ddp_sync_bn_matches_one_process_over_whole_batch(backend, fmt_name, tmp_path):
    """cpu: the core units (conv, then the BatchNorm ops); triton (interpreted): the fused conv chain."""
    fmt = getattr(torch, fmt_name)
    mp.spawn(_worker, args=(2, _free_port(), backend, fmt_name, str(tmp_path)), nprocs=2, join=True)
    expected, expected_buffers = _run_reference(fmt)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for step, ref in enumerate(expected):
        y = torch.cat([ranks[r][0][step]["y"] for r in range(2)])
        assert_close_scaled(y, ref["y"], 1e-5, msg=f"step {step} output")
        x_grad = torch.cat([ranks[r][0][step]["x_grad"] for r in range(2)])
        assert_close_scaled(x_grad, ref["x_grad"], 1e-4, msg=f"step {step} input gradient")
        for r in range(2):
            for name, g in ref["grads"].items():
                assert_close_scaled(ranks[r][0][step]["grads"][name], g, 1e-4, msg=f"step {step} rank {r} {name}")
    for r in range(2):
        for name, b in expected_buffers.items():
            got = ranks[r][1][name]
            if b.dtype == torch.long:
                assert torch.equal(got, b), name
            else:
                assert_close_scaled(got, b, 1e-5, msg=f"rank {r} {name}")


def test_sync_bn_without_a_process_group_is_plain_batchnorm():
    """nn.SyncBatchNorm's rule: no initialized process group, nothing to synchronize."""
    model = _model()
    fused = fusedres.fuse(copy.deepcopy(model), sync_bn=True)
    assert isinstance(fused.block1.bn1, fusedres.SyncBatchNorm2d)
    assert isinstance(fused.stem[1], fusedres.SyncBatchNorm2d)
    assert set(fused.state_dict()) == set(model.state_dict())
    x = torch.randn(4, 3, 5, 5) + 0.5
    assert_close_scaled(fused(x), model(x), 1e-5)


def test_sync_bn_argument_errors():
    with pytest.raises(ValueError, match="process_group.*sync_bn=True"):
        fusedres.fuse(_model(), process_group=object())
    with pytest.raises(TypeError, match="sync_bn must be a bool"):
        fusedres.fuse(_model(), sync_bn="yes")
    with pytest.raises(ValueError, match="process_group.*sync_bn=True"):
        fusedres.FusedBasicBlock(8, 8, process_group=object())
    block = fusedres.FusedBottleneck(16, 4, sync_bn=True)
    assert all(isinstance(block.get_submodule(n), fusedres.SyncBatchNorm2d) for n in ("bn1", "bn2", "bn3"))
    assert set(block.state_dict()) == set(fusedres.FusedBottleneck(16, 4).state_dict())
