"""Overhead per block: host time and device launches of a fused block against stock eager, per
path and block kind, train step (forward + backward) and eval forward (no gradients).

    python benchmarks/bench_overhead.py [--quick] [--json PATH]

Tiny tensors (batch 2, 4x4 pixels) and one thread, so the time is framework overhead: Python,
dispatch, autograd, launch. It is the same per call on a GPU host, where a block whose host time
exceeds its device time leaves the GPU idle.

Device launches: every Triton launch (fusedres.common.launch marks each with a `triton::` profiler
range) plus every leaf compute op of aten or of the extension in torch.profiler's op tree (an op
with no compute op beneath it; allocation, views and metadata ops launch nothing). Counts are
deterministic; tests/test_overhead.py holds them to their budgets.

Paths:
  core   aten's conv with the BatchNorm ops (the cpu backend here; cuda on a GPU)
  chain  the fused conv kernels (triton backend; on the CPU only under TRITON_INTERPRET=1, in a
         subprocess: the interpreter's time is no host time, so the chain gets counts only there)
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn as nn

import fusedres
from fusedres.models.densenet import DenseLayer, Transition
from fusedres.models.resnet import BasicBlock, Bottleneck

# Leaf ops that launch nothing: allocation, views, metadata, no-op conversions.
NO_LAUNCH = frozenset("aten::" + n for n in (
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view", "as_strided",
    "reshape", "_reshape_alias", "t", "transpose", "permute", "expand", "expand_as", "unsqueeze", "squeeze", "select",
    "slice", "narrow", "detach", "detach_", "alias", "lift_fresh", "resize_", "set_", "contiguous", "to",
    "result_type", "unbind", "split", "chunk", "view_as", "flatten", "unflatten", "resolve_conj", "resolve_neg",
    "size", "stride", "numel", "dim", "sym_size", "_has_compatible_shallow_copy_type", "is_same_size",
    "_local_scalar_dense", "item", "_nnpack_available"))


def _is_op(name: str) -> bool:
    return name.startswith("aten::") or name.startswith("fusedres_kernels::") or name.startswith("triton::")


def _launches(event) -> List[str]:
    """The launches at or below a profiler event (see the module docstring)."""
    if event.name.startswith("triton::"):
        return [event.name]
    below = [n for child in event.cpu_children for n in _launches(child)]
    if below:
        return below
    if _is_op(event.name) and event.name not in NO_LAUNCH:
        return [event.name]
    return []


def count_launches(fn: Callable[[], object]) -> Dict[str, int]:
    """{op name: launches} of one call of fn, from torch.profiler's CPU op tree."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    counts: Dict[str, int] = {}
    for event in prof.events():
        if event.cpu_parent is None:
            for name in _launches(event):
                counts[name] = counts.get(name, 0) + 1
    return counts


def block_cases():
    """(kind, stock module, fused class, input channels): the block kinds of a ResNet / DenseNet."""
    torch.manual_seed(0)
    downsample = nn.Sequential(nn.Conv2d(64, 256, 1, bias=False), nn.BatchNorm2d(256))
    return [
        ("BasicBlock", BasicBlock(64, 64), fusedres.FusedBasicBlock, 64),
        ("Bottleneck", Bottleneck(256, 64), fusedres.FusedBottleneck, 256),
        ("Bottleneck+downsample", Bottleneck(64, 64, downsample=downsample), fusedres.FusedBottleneck, 64),
        ("dense layer", DenseLayer(64, 32, 4, 0.0), fusedres.FusedDenseLayer, 64),
        ("transition", Transition(64, 32), fusedres.FusedTransition, 64),
    ]


def _steps(module: nn.Module, x: torch.Tensor):
    """(train step, eval forward) callables of module on x."""
    def train():
        module.train()
        for p in module.parameters():
            p.grad = None
        xi = x.detach().requires_grad_()
        module(xi).sum().backward()

    def evaluate():
        module.eval()
        with torch.no_grad():
            module(x)

    return train, evaluate


def _median_us(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def measure(path: str, device: torch.device, memory_format, quick: bool, timed: bool = True) -> List[Dict]:
    """One row per (block kind, mode): stock and fused host microseconds (median, interleaved) and
    launches. path "core" runs the cpu / cuda backend, "chain" the triton backend."""
    backend = "triton" if path == "chain" else ("cuda" if device.type == "cuda" else "cpu")
    rows = []
    for kind, stock, fused_cls, channels in block_cases():
        stock = stock.to(device, memory_format=memory_format)
        fused = fused_cls.from_module(copy.deepcopy(stock))
        x = (torch.randn(2, channels, 4, 4, device=device) + 0.5).contiguous(memory_format=memory_format)
        for mode, index in (("train", 0), ("eval", 1)):
            stock_fn, fused_fn = _steps(stock, x)[index], _steps(fused, x)[index]
            with fusedres.use_backend(backend):
                for _ in range(3):  # warm-up: first calls resolve backends, fill caches
                    stock_fn(), fused_fn()
                row = dict(path=path, block=kind, mode=mode, stock_launches=sum(count_launches(stock_fn).values()),
                           fused_launches=sum(count_launches(fused_fn).values()))
                if timed:
                    stock_us, fused_us = [], []
                    for _ in range(5 if quick else 15):  # interleaved rounds: drift hits both alike
                        stock_us.append(_median_us(stock_fn, 10))
                        fused_us.append(_median_us(fused_fn, 10))
                    row.update(stock_us=statistics.median(stock_us), fused_us=statistics.median(fused_us))
                    row["host_ratio"] = row["fused_us"] / row["stock_us"]
            rows.append(row)
    return rows


def _chain_rows_interpreted(quick: bool) -> List[Dict]:
    """The chain path's launch counts on the CPU: a subprocess under TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = (f"import sys, json; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            "import torch, bench_overhead as b; torch.set_num_threads(1); "
            "print('ROWS' + json.dumps(b.measure('chain', torch.device('cpu'), torch.channels_last, True, False)))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"bench_overhead: the interpreted chain run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.split("ROWS", 1)[1])


def run(device: torch.device, quick: bool = False) -> List[Dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # the fused units' own overhead, not the CPU's measured training choice (which may run stock)
    train_path = os.environ.get("FUSEDRES_CPU_TRAIN_PATH")
    os.environ["FUSEDRES_CPU_TRAIN_PATH"] = "fused"
    try:
        rows = measure("core", device, torch.channels_last if device.type == "cuda" else torch.contiguous_format, quick)
        if device.type == "cuda":
            rows += measure("chain", device, torch.channels_last, quick)
        else:
            rows += _chain_rows_interpreted(quick)
    finally:
        torch.set_num_threads(threads)
        if train_path is None:
            os.environ.pop("FUSEDRES_CPU_TRAIN_PATH", None)
        else:
            os.environ["FUSEDRES_CPU_TRAIN_PATH"] = train_path
    return rows


COLUMNS = ["path", "block", "mode", "stock_us", "fused_us", "host_ratio", "stock_launches", "fused_launches"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    from common import table

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = run(device, args.quick)
    print(table(rows, COLUMNS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
