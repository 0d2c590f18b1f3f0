"""The Triton kernel variants a workload launches: recorded without running them, then compiled
through triton's own launch path, in parallel.

Two uses:
  - No GPU (CI, tests/test_sm90_compile.py): the fused ResNet-50 and ResNeXt-50 run a train step
    and an eval forward under TRITON_INTERPRET=1 with every launch recorded and skipped, planned
    as on an H200 (132 SMs, no interpreter tiles, tf32 for float32 as cuDNN's default); then, in a
    process without the interpreter, each distinct launch is compiled for sm_90 and cuobjdump
    reads its registers and stack frame (spills) off the cubin.
  - A cold GPU machine (benchmarks/gpu_stage1.py): a part's workload runs once with its launches
    recorded and skipped, and the distinct ones are compiled on every CPU core into triton's
    cache, so the timed run that follows finds them compiled (a launch compiles serially in the
    launching process: ~2 s per variant, ~190 variants for the two models).

A launch is kept as its kernel, its options and its arguments (tensors as dtype and the 16-byte
alignment of the real data pointer, integers as values). Compiling it goes through triton's
binder for the target, so integer 1 becomes a constant and multiples of 16 are marked divisible
exactly as a launch on the device specializes them; triton.compile's cache key is then the one a
real launch computes.

  python benchmarks/triton_variants.py record OUT.json [--models resnet50,resnext50_32x4d] [--batch 2]
  python benchmarks/triton_variants.py compile IN.json [--jobs N]     (one JSON line per variant)
"""
import argparse
import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

H200_SMS = 132


# ---------------------------------------------------------------------------------------------
# record
# ---------------------------------------------------------------------------------------------
def _describe(value):
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).replace("torch.", ""), "aligned": value.data_ptr() % 16 == 0}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    name = getattr(value, "name", None)  # a triton.language dtype (ACC=tl.float32)
    if name is not None:
        return {"tl": name}
    raise TypeError(f"cannot record a launch argument of type {type(value).__name__}")


@contextlib.contextmanager
def recording(plan_for_h200: bool = False):
    """Within: every fusedres Triton launch is appended to the yielded list and not run (outputs
    stay scratch memory). plan_for_h200 (no GPU, under the interpreter): launch plans as on an H200."""
    import torch

    from fusedres import common
    from fusedres.kernels import conv_triton
    from fusedres.ops import conv as conv_ops

    launches = []
    saved = (common._launch, common.sm_count, conv_triton.triton_interpreted, conv_triton._dot_flags,
             conv_triton._choose, conv_ops.gpu_shape_rules_apply)

    def recorder(kernel, grid, device, args, kwargs):
        fn = getattr(kernel, "fn", kernel)
        launches.append(dict(module=fn.__module__, kernel=fn.__name__, grid=[int(g) for g in grid],
                             args=[_describe(a) for a in args],
                             kwargs={k: _describe(v) for k, v in kwargs.items()}, context=launches_context[0]))

    def choose_untimed(key, device, candidates, default, run):
        # autotuning while nothing runs: each candidate launched (recorded) once, no timing (do_bench
        # would record hundreds of launches per candidate), the default kept
        if conv_triton.autotune_enabled(device):
            for cfg in candidates:
                run(cfg)
        return default

    launches_context = [""]
    common._launch = recorder
    conv_triton._choose = choose_untimed
    if plan_for_h200:
        real_dot_flags = conv_triton._dot_flags
        common.sm_count = lambda device: H200_SMS
        conv_triton.triton_interpreted = lambda: False
        conv_triton._dot_flags = lambda dtype, device: real_dot_flags(dtype, torch.device("cuda"))
        conv_ops.gpu_shape_rules_apply = lambda x: True  # the GPU's choice of conv per shape
    try:
        yield launches, launches_context
    finally:
        common._launch, common.sm_count, conv_triton.triton_interpreted, conv_triton._dot_flags, \
            conv_triton._choose, conv_ops.gpu_shape_rules_apply = saved


def record_models(models, batch, size, dtypes):
    """Launches of a fused train step and eval forward of each model of fusedres.models in the first
    dtype, of the first model in the others, and of the first model with its weights left NCHW;
    planned for an H200, on the CPU under the interpreter."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "record runs under TRITON_INTERPRET=1"
    os.environ["FUSEDRES_BACKEND"] = "triton"
    os.environ["FUSEDRES_POISON_OUTPUTS"] = "0"
    os.environ["FUSEDRES_AUTOTUNE"] = "0"
    import torch

    import fusedres
    from fusedres import models as model_zoo

    runs = [(name, dtypes[0], True) for name in models] + [(models[0], dtype, True) for dtype in dtypes[1:]]
    # weights left NCHW (only the input made channels_last): a 1x1 weight then has (C, 1, 1, 1)
    # strides, which must not cost the kernels their vector loads
    runs.append((models[0], dtypes[0], False))
    torch.manual_seed(0)
    with recording(plan_for_h200=True) as (launches, context):
        for name, dtype, weights_channels_last in runs:
            model = fusedres.fuse(getattr(model_zoo, name)()).to(dtype=dtype)
            if weights_channels_last:
                model = model.to(memory_format=torch.channels_last)
            x = torch.randn(batch, 3, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
            tag = f"{name} {str(dtype).replace('torch.', '')}" + ("" if weights_channels_last else " NCHW weights")
            context[0] = f"{tag} train"
            model.train()
            model(x).float().sum().backward()
            context[0] = f"{tag} eval"
            model.eval()
            with torch.no_grad():
                model(x)
    return launches


# ---------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------
def _value(desc):
    import torch
    import triton.language as tl

    if isinstance(desc, dict) and "tensor" in desc:
        t = torch.empty(32, dtype=getattr(torch, desc["tensor"]))
        return t if desc["aligned"] else t[1:]  # the binder reads data_ptr() % 16
    if isinstance(desc, dict) and "tl" in desc:
        return getattr(tl, {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16",
                            "fp16": "float16"}.get(desc["tl"], desc["tl"]))
    return desc


def _target(sm90: bool):
    from triton.backends.compiler import GPUTarget

    if sm90:
        return GPUTarget("cuda", 90, 32)
    from triton.runtime import driver

    return driver.active.get_current_target()


def _bind(launch, sm90: bool):
    """(fn, specialization key, target, compile inputs) as triton's JITFunction.run makes them
    for this launch's arguments (triton 3.6 to 3.9)."""
    import importlib

    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    target = _target(sm90)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [_value(a) for a in launch["args"]]
    kwargs = {k: _value(v) for k, v in launch["kwargs"].items()}
    kwargs["debug"] = bool(fn.debug or knobs.runtime.debug)
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # what run() adds, per version
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    bound_args, specialization, options = binder(*args, **kwargs)
    packed = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    key = (launch["module"], launch["kernel"], repr(specialization), repr(sorted(vars(packed[0]).items())))
    return fn, key, target, packed


def _resource_usage(cubin: bytes) -> dict:
    """Registers and stack frame (spills and local arrays) of the cubin triton built, as cuobjdump
    reads them off it (triton's own ptxas flags, so the figures are the launch's)."""
    from triton.backends.nvidia.compiler import get_ptxas

    cuobjdump = os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True)
    regs = re.search(r"REG:(\d+)", out.stdout)
    stack = re.search(r"STACK:(\d+)", out.stdout)
    if not (regs and stack):
        raise RuntimeError(f"cuobjdump -res-usage gave no figures: {out.stdout[-500:]} {out.stderr[-500:]}")
    return dict(registers=int(regs.group(1)), stack_bytes=int(stack.group(1)))


def _loads(ptx: str) -> dict:
    """Global loads by how they move data: cp.async (pipelined into shared memory) by bytes per
    copy, and plain ld.global by vector width and bits ("4x32": 16 bytes)."""
    cp = {}
    for size in re.findall(r"cp\.async\.c[ag]\.shared\.global(?:\.L2::\w+)?\s+\[[^\]]+\],\s*\[[^\]]+\],\s*"
                           r"(0x[0-9a-f]+|\d+)", ptx):
        size = str(int(size, 0))
        cp[size] = cp.get(size, 0) + 1
    ld = {}
    for vec, bits in re.findall(r"ld\.global(?:\.\w+)*?(\.v\d)?\.b(\d+)", ptx):
        k = f"{vec[2:] if vec else '1'}x{bits}"
        ld[k] = ld.get(k, 0) + 1
    return dict(cp_async_bytes=cp, ld_global=ld)


def compile_one(item):
    """Compile one distinct launch (into triton's cache); with report, what the compiler made of it.
    Warming (no report): a variant that fails is returned as an error row, the others still compile
    (the real launch compiles it again and raises there)."""
    launch, contexts, sm90, report = item
    if not report:
        try:
            return _compile_one(launch, contexts, sm90, report)
        except Exception as e:
            return dict(kernel=launch["kernel"], contexts=contexts, seconds=0.0, error=f"{type(e).__name__}: {e}"[:500])
    return _compile_one(launch, contexts, sm90, report)


def _compile_one(launch, contexts, sm90, report):
    import triton

    t0 = time.perf_counter()
    fn, key, target, (options, signature, constexprs, attrs) = _bind(launch, sm90)
    compiled = triton.compile(triton.compiler.ASTSource(fn, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    row = dict(kernel=launch["kernel"], contexts=contexts, seconds=round(time.perf_counter() - t0, 2))
    if not report:
        return row
    ptx = compiled.asm["ptx"]
    kw = launch["kwargs"]
    row.update(grid=launch["grid"], config={k: kw[k] for k in kw if k.isupper() or k in ("num_warps", "num_stages")},
               integer_args={str(i): a for i, a in enumerate(launch["args"])
                             if isinstance(a, int) and not isinstance(a, bool)},
               unaligned_pointers=[i for i, a in enumerate(launch["args"])
                                   if isinstance(a, dict) and "tensor" in a and not a["aligned"]],
               shared=compiled.metadata.shared, wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
               **_loads(ptx), **_resource_usage(compiled.asm["cubin"]))
    return row


def distinct(launches, sm90: bool = True):
    """[(launch, contexts)] for the distinct compilations among the launches."""
    same = {}  # identical launches first (cheap), then triton's specialization (~2 ms a launch)
    for launch in launches:
        text = json.dumps([launch["module"], launch["kernel"], launch["args"], launch["kwargs"]], sort_keys=True)
        same.setdefault(text, [launch, set()])[1].add(launch["context"])
    groups = {}
    for launch, contexts in same.values():
        groups.setdefault(_bind(launch, sm90)[1], [launch, set()])[1].update(contexts)
    return [(launch, sorted(ctx)) for launch, ctx in groups.values()]


def compile_all(launches, jobs: int, sm90: bool = True, report: bool = True):
    assert os.environ.get("TRITON_INTERPRET") != "1", "compile runs without the interpreter"
    items = [(launch, ctx, sm90, report) for launch, ctx in distinct(launches, sm90)]
    if jobs <= 1 or len(items) <= 1:
        return [compile_one(i) for i in items]
    # spawn: the parent may hold a CUDA context, which a forked child must not inherit
    with ProcessPoolExecutor(min(jobs, len(items)), mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(compile_one, items))


def warm_cache(workload, jobs: int = 0) -> dict:
    """Run workload() once with its Triton launches recorded and skipped, then compile the distinct
    ones for this machine's GPU on `jobs` processes (default: every core) into triton's cache.
    Returns counts and seconds. Skipped launches leave outputs unwritten: run the workload for real
    afterwards."""
    t0 = time.perf_counter()
    with recording() as (launches, _):
        workload()
    recorded = time.perf_counter() - t0
    rows = compile_all(launches, jobs or len(os.sched_getaffinity(0)), sm90=False, report=False)
    return dict(launches=len(launches), variants=len(rows), record_s=round(recorded, 1),
                compile_s=round(time.perf_counter() - t0 - recorded, 1),
                slowest_compile_s=max((r["seconds"] for r in rows), default=0.0),
                errors=[r for r in rows if "error" in r])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("out")
    rec.add_argument("--models", default="resnet50,resnext50_32x4d")
    rec.add_argument("--dtypes", default="bfloat16,float32")
    rec.add_argument("--batch", type=int, default=2)
    rec.add_argument("--size", type=int, default=224)
    comp = sub.add_parser("compile")
    comp.add_argument("launches")
    comp.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)
    if args.step == "record":
        import torch

        launches = record_models(args.models.split(","), args.batch, args.size,
                                 [getattr(torch, d) for d in args.dtypes.split(",")])
        with open(args.out, "w") as f:
            json.dump(launches, f)
        print(f"{len(launches)} launches recorded", file=sys.stderr)
        return 0
    with open(args.launches) as f:
        launches = json.load(f)
    for row in compile_all(launches, args.jobs):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
