"""Stage 1 of the GPU check: the parts that must give real answers within 8 minutes on a cold H200
(benchmarks/gpu_check.sh runs each as its own process under its own timeout, build first).

    python benchmarks/gpu_stage1.py PART --out DIR [--dry-run]

Parts, in order, with their time budgets (seconds, on a cold H200; gpu_check.sh enforces them):
  kernels     75  tests/test_gpu_kernels.py and tests/test_large.py on the GPU, strict: every kernel
                  family at real shapes (several tiles, split-K, bf16/tf32/fp32, > 2^31 elements, a
                  non-default GPU where there is one, a CUDA graph capture), 8 pytest workers so
                  Triton compiles on 4 cores
  convs       75  each distinct ResNet-50 conv (and two ResNeXt-50 grouped ones) against cuDNN:
                  forward, input grad, weight grad, bf16, batch 256, channels_last; error against
                  float64 next to cuDNN's, and the time of both; default configuration, and
                  autotuned for three
  bottleneck  30  one ResNet-50 Bottleneck (layer2.0, downsample) train step: fused against eager,
                  errors against float64 next to eager's, and the time of both
  resnet50   140  ResNet-50 train step and inference, bf16 autocast, channels_last, batch 256: eager,
                  fusedres, torch.compile (inference first; the compiled train step last, the
                  slowest to compile)
The fused convs run their default configurations (FUSEDRES_AUTOTUNE=0) except where the convs
part tunes three on purpose: tuning a whole model compiles and times ~10 candidates per kernel.
Each part writes DIR/stage1_<part>.json after every row, so a part killed at its budget still
leaves what it measured, with "finished": false (gpu_check.sh writes a first one before the part
starts, so a part killed before it got to write its own leaves that). The Triton variants a part launches are compiled
first on every CPU core (triton_variants.warm_cache), not one by one as the launches meet them.

--dry-run (CI, no GPU): the same plumbing on the CPU at toy sizes, Triton under the interpreter, no
timing claims and no torch.compile; its JSON says dry_run.
"""
import argparse
import copy
import datetime
import math
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PARTS = {"kernels": 75, "convs": 75, "bottleneck": 30, "resnet50": 140, "memory": 35}


class Part:
    """The JSON of one part, rewritten after every row."""

    def __init__(self, name, out, dry_run):
        self.path = os.path.join(out, f"stage1_{name}.json")
        self.t0 = time.perf_counter()
        self.budget = int(os.environ.get("FUSEDRES_PART_BUDGET", PARTS[name]))  # gpu_check.sh's
        self.data = dict(part=name, budget_s=self.budget, dry_run=dry_run, finished=False, rows=[],
                         started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         environment=None)
        self.save()  # first, before the imports _environment makes (seconds on a loaded machine)
        self.set(environment=_environment())

    def row(self, **row):
        row["t_s"] = round(time.perf_counter() - self.t0, 1)
        self.data["rows"].append(row)
        print(" ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
        self.save()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def set(self, **fields):
        self.data.update(fields)
        self.save()

    def save(self):
        self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            import json

            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)  # a kill mid-write leaves the previous version, never half a file


def _environment():
    import platform

    import triton

    env = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               triton=triton.__version__, device="cpu")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, sm_count=props.multi_processor_count, gpus=torch.cuda.device_count(),
                   memory_gb=round(props.total_memory / 2**30, 1))
    try:
        import fusedres

        env["fusedres_extension"] = fusedres.extension_loaded()
    except Exception as e:  # reported, the part still runs (and fails where it needs the package)
        env["fusedres_extension"] = f"import failed: {e}"
    return env


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def scaled_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| (against a float64 expected)."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def timed_ms(fn, device, dry_run, n=None) -> float:
    """Median ms of fn() (do_bench on a GPU); one untimed call in a dry run."""
    if dry_run or device.type != "cuda":
        fn()
        return float("nan")
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def warm(part, workload, dry_run):
    """Compile what workload() launches on every core first (a dry run records only)."""
    sys.path.insert(0, HERE)
    import triton_variants

    if dry_run:
        with triton_variants.recording() as (launches, _):
            workload()
        part.set(warm=dict(launches=len(launches), compiled="not in a dry run"))
        return
    part.set(warm=triton_variants.warm_cache(workload))


# -------------------------------------------------------------------------------------------------
def part_kernels(part, device, dry_run):
    xml = part.path.replace(".json", ".xml")
    workers = [] if dry_run else ["-n", "8"]  # 8 processes compile the variants side by side
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *workers, f"--junitxml={xml}",
           os.path.join(ROOT, "tests", "test_gpu_kernels.py"), os.path.join(ROOT, "tests", "test_large.py")]
    env = dict(os.environ, FUSEDRES_STRICT="1", PYTHONSAFEPATH="1")
    try:  # its own timeout inside the part's, so the junit XML and this JSON are still written
        proc = subprocess.run(cmd, cwd=os.path.join(ROOT, "tests"), env=env, capture_output=True, text=True,
                              timeout=max(10, part.budget - 15))
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = "timeout", (e.stdout or b"").decode(errors="replace"), ""
    counts, failures = dict(passed=0, failed=0, skipped=0), []
    if os.path.exists(xml):
        for case in ElementTree.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                counts["failed"] += 1
                node = case.find("failure") if case.find("failure") is not None else case.find("error")
                failures.append(dict(test=name, message=(node.get("message") or "")[:500]))
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
                part.row(test=name, outcome="skipped", reason=(case.find("skipped").get("message") or "")[:200])
            else:
                counts["passed"] += 1
    part.set(pytest_rc=rc, counts=counts, failures=failures, output_tail=stdout[-3000:])
    if rc not in (0, 5) or failures:  # a failed GPU test fails the part (and stage 1)
        raise RuntimeError(f"pytest: {rc}, {counts}:\n{stdout[-2000:]}\n{stderr[-2000:]}")


# -------------------------------------------------------------------------------------------------
def _distinct_convs(dry_run):
    """(label, x shape without batch, weight shape, stride, padding, groups) of each distinct
    ResNet-50 conv at 224x224, and two grouped ResNeXt-50 ones."""
    sys.path.insert(0, HERE)
    import bench_conv

    if dry_run:
        return [("toy 3x3", (16, 9, 9), (16, 16, 3, 3), (1, 1), (1, 1), 1),
                ("toy 1x1 s2", (16, 9, 9), (32, 16, 1, 1), (2, 2), (0, 0), 1),
                ("toy 3x3 g4", (16, 9, 9), (16, 4, 3, 3), (1, 1), (1, 1), 4)]
    every = bench_conv.distinct_convs(1)
    convs = [c for c in every if c[0] == "resnet50"]
    grouped = [c for c in every if c[0] == "resnext50_32x4d" and c[6] > 1][:2]
    return [(f"{arch} {name}", x[1:], w, s, p, g) for arch, name, x, w, s, p, g in convs + grouped]


def part_convs(part, device, dry_run):
    from fusedres import ops
    from fusedres.kernels import conv_triton

    import fusedres

    batch = 2 if dry_run else 256
    dtype = torch.float32 if dry_run else torch.bfloat16
    convs = _distinct_convs(dry_run)
    tuned = {0, len(convs) // 2, len(convs) - 1}  # three convs also run autotuned
    cases = []
    for label, x_shape, w_shape, stride, padding, groups in convs:
        torch.manual_seed(len(cases))
        x = (torch.randn((batch,) + tuple(x_shape), device=device) + 0.5).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        w = (torch.randn(w_shape, device=device) / math.sqrt(w_shape[1] * w_shape[2] * w_shape[3])).to(dtype)
        w = w.contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x, w, None, stride, padding, 1, groups)
        g = torch.randn_like(y)
        cases.append((label, x, w, g, (stride, padding, (1, 1), groups)))

    def ours(kind, x, w, g, conv):
        if kind == "forward":
            return lambda: ops.conv2d_forward(x, w, None, *conv)[0]
        if kind == "input grad":
            return lambda: ops.conv2d_input_grad(g, w, x, *conv)[0]
        return lambda: ops.conv2d_weight_grad(g, x, w, *conv)

    def cudnn(kind, x, w, g, conv):
        stride, padding, dilation, groups = conv
        if kind == "forward":
            return lambda: F.conv2d(x, w, None, stride, padding, dilation, groups)
        mask = [kind == "input grad", kind == "weight grad", False]
        return lambda: torch.ops.aten.convolution_backward(g, x, w, None, list(stride), list(padding),
                                                           list(dilation), False, [0, 0], groups, mask)[
            0 if kind == "input grad" else 1]

    kinds = ("forward", "input grad", "weight grad")

    def every_launch():
        # the default configurations, then every candidate of the autotuned convs (recorded while
        # nothing runs, the tuner's choices are discarded)
        for tune in (False, True):
            os.environ["FUSEDRES_AUTOTUNE"] = "1" if tune else "0"
            for i, c in enumerate(cases):
                if not tune or i in tuned:
                    for k in kinds:
                        ours(k, *c[1:])()
        os.environ["FUSEDRES_AUTOTUNE"] = "0"

    with fusedres.use_backend("triton"):
        warm(part, every_launch, dry_run)
        for tune in (False, True):
            os.environ["FUSEDRES_AUTOTUNE"] = "1" if tune else "0"
            for i, (label, x, w, g, conv) in enumerate(cases):
                if tune and i not in tuned:
                    continue
                stride, padding, dilation, groups = conv
                x64, w64, g64 = x.double(), w.double(), g.double()
                refs = {"forward": lambda: F.conv2d(x64, w64, None, stride, padding, dilation, groups),
                        "input grad": lambda: torch.nn.grad.conv2d_input(x64.shape, w64, g64, stride, padding,
                                                                         dilation, groups),
                        "weight grad": lambda: torch.nn.grad.conv2d_weight(x64, w64.shape, g64, stride, padding,
                                                                           dilation, groups)}
                for kind in kinds:
                    fused, stock = ours(kind, x, w, g, conv), cudnn(kind, x, w, g, conv)
                    ref = refs[kind]()
                    err, stock_err = scaled_error(fused(), ref), scaled_error(stock(), ref)
                    del ref
                    ms, ms_stock = timed_ms(fused, device, dry_run), timed_ms(stock, device, dry_run)
                    flops = 2.0 * y_numel(x, w, stride, padding) * w.shape[1] * w.shape[2] * w.shape[3]
                    part.row(conv=label, kind=kind, config="autotuned" if tune else "default", error=err,
                             cudnn_error=stock_err, error_ok=err <= max(2 * stock_err, 2e-3), ms=ms,
                             ms_cudnn=ms_stock, speedup_vs_cudnn=ms_stock / ms if ms == ms else None,
                             tflops=flops / ms / 1e9 if ms == ms else None)
        os.environ["FUSEDRES_AUTOTUNE"] = "0"
    part.set(tuned_configs={str(k): v for k, v in conv_triton.tuned_configs().items()})


def y_numel(x, w, stride, padding):
    p = (x.shape[2] + 2 * padding[0] - w.shape[2]) // stride[0] + 1
    q = (x.shape[3] + 2 * padding[1] - w.shape[3]) // stride[1] + 1
    return x.shape[0] * w.shape[0] * p * q


# -------------------------------------------------------------------------------------------------
def _train_errors(models, x, dtype, device):
    """{impl: (output error, input-grad error)} of a train forward + backward under autocast,
    against the float64 copy of the first model."""
    ref = copy.deepcopy(models["eager"]).double()
    x64 = x.double().requires_grad_()
    y64 = ref(x64)
    y64.float().square().sum().backward()
    out = {}
    for impl, m in models.items():
        xi = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            y = m(xi)
        y.float().square().sum().backward()
        out[impl] = (scaled_error(y, y64), scaled_error(xi.grad, x64.grad))
    return out


def part_bottleneck(part, device, dry_run):
    import fusedres
    from fusedres.models.resnet import Bottleneck

    batch, size, dtype = (2, 8, torch.float32) if dry_run else (256, 56, torch.bfloat16)
    torch.manual_seed(0)
    down = torch.nn.Sequential(torch.nn.Conv2d(256, 512, 1, 2, bias=False), torch.nn.BatchNorm2d(512))
    stock = Bottleneck(256, 128, 2, down).to(device, memory_format=torch.channels_last)
    for m in stock.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.5)
    models = {"eager": stock, "fusedres": fusedres.fuse(copy.deepcopy(stock))}
    xs = [(torch.randn(batch, 256, size, size, device=device) + 0.5).contiguous(memory_format=torch.channels_last)
          for _ in range(2)]

    def step(m, x):
        def call():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                m(x).float().sum().backward()
        return call

    warm(part, step(models["fusedres"], xs[0].requires_grad_()), dry_run)
    errors = _train_errors(models, xs[1], dtype, device)
    times = {}
    for impl, m in models.items():
        x = xs[0].requires_grad_()
        times[impl] = timed_ms(step(m, x), device, dry_run)
        part.row(block="resnet50 layer2.0 Bottleneck s2 + downsample", impl=impl, mode="train step", batch=batch,
                 dtype=str(dtype)[6:], ms=times[impl], output_error=errors[impl][0], input_grad_error=errors[impl][1],
                 speedup_vs_eager=times["eager"] / times[impl] if times[impl] == times[impl] else None)
    ok = all(errors["fusedres"][i] <= max(2 * errors["eager"][i], 1e-5) for i in range(2))
    part.set(errors_ok=ok)


# -------------------------------------------------------------------------------------------------
def part_resnet50(part, device, dry_run):
    import fusedres
    from fusedres.models import resnet18, resnet50

    batch, size, dtype = (2, 32, torch.float32) if dry_run else (256, 224, torch.bfloat16)
    torch.manual_seed(0)
    base = (resnet18 if dry_run else resnet50)(num_classes=1000).to(device, memory_format=torch.channels_last)
    xs = [torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
          for _ in range(2)]
    labels = torch.randint(0, 1000, (batch,), device=device)
    amp = dtype != torch.float32

    def infer(m, x):
        def call():
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=amp):
                return m(x)
        return call

    def train(m, opt, x):
        def call():
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                loss = F.cross_entropy(m(x).float(), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return call

    fused = fusedres.fuse(copy.deepcopy(base))
    warm(part, lambda: (train(fused.train(), torch.optim.SGD(fused.parameters(), lr=0.0), xs[0])(),
                        infer(fused.eval(), xs[0])()), dry_run)
    impls = [("eager", lambda: copy.deepcopy(base)), ("fusedres", lambda: fusedres.fuse(copy.deepcopy(base)))]
    if not dry_run:
        impls.append(("torch.compile", lambda: torch.compile(copy.deepcopy(base))))
    base_ms = {}
    # inference of all three first, then the train steps (the compiled train step compiles longest)
    for mode in ("inference", "train step"):
        for impl, make in impls:
            if impl == "torch.compile" and mode == "train step" and part.elapsed() > 0.6 * part.budget:
                # inductor's cold compile of a train step takes ~60-120 s: rather a row saying so
                # than the part killed at its budget
                part.row(model="resnet50", mode=mode, impl=impl, batch=batch, dtype=str(dtype)[6:],
                         note=f"skipped: {part.elapsed():.0f} s of the {part.budget} s budget used")
                continue
            t0 = time.perf_counter()
            m = make()
            if mode == "inference":
                fn = infer(m.eval(), xs[0])
            else:
                opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
                fn = train(m.train(), opt, xs[0])
            fn()  # compiles (torch.compile) and tunes, outside the timing
            first_s = time.perf_counter() - t0
            ms = timed_ms(fn, device, dry_run)
            base_ms.setdefault(mode, ms)
            part.row(model="resnet50" if not dry_run else "resnet18 (dry run)", mode=mode, impl=impl, batch=batch,
                     dtype=str(dtype)[6:], ms=ms, images_per_s=batch / ms * 1e3 if ms == ms else None,
                     speedup_vs_eager=base_ms[mode] / ms if ms == ms else None, first_call_s=round(first_s, 1))
            del m, fn
            if device.type == "cuda":
                torch.cuda.empty_cache()


def part_memory(part, device, dry_run):
    """Issue 25: the peak memory of a ResNet-50 train step (batch 256, bfloat16 autocast,
    channels_last), stock against fused (default, and memory_efficient=True), from
    torch.cuda.max_memory_allocated after the model, its gradients and the batch are in place;
    and memory_report's saved-for-backward bytes of the same model. A dry run (CPU) takes a
    ResNet-18 at batch 2 and reports the saved bytes only."""
    import fusedres
    from fusedres.models import resnet18, resnet50

    batch, size, dtype = (2, 32, torch.float32) if dry_run else (256, 224, torch.bfloat16)
    torch.manual_seed(0)
    base = (resnet18 if dry_run else resnet50)(num_classes=1000).to(device, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)
    amp = dtype != torch.float32
    report = fusedres.memory_report(base, x[:8] if not dry_run else x)
    part.row(what="saved for backward (memory_report, batch 8 float32)", stock_mib=report.stock_bytes / 2**20,
             fused_mib=report.fused_bytes / 2**20, ratio=report.ratio)
    for impl in ("stock", "fused", "fused memory_efficient"):
        m = copy.deepcopy(base) if impl == "stock" else fusedres.fuse(base, memory_efficient="efficient" in impl)
        m.train()
        for p in m.parameters():  # gradients allocated first: the peak below is the step's activations
            p.grad = torch.zeros_like(p)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = F.cross_entropy(m(x).float(), labels)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
            part.row(what="train step peak above model + gradients + batch", impl=impl, batch=batch,
                     dtype=str(dtype)[6:], peak_mib=peak / 2**20)
        del m, loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=list(PARTS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    os.environ["FUSEDRES_STRICT"] = "1"  # a green means the fused kernels ran (issue 15)
    # default conv configurations: tuning every conv of a model would compile ~10 candidates per
    # kernel and time each; the convs part tunes three convs on purpose
    os.environ["FUSEDRES_AUTOTUNE"] = "0"
    if not args.dry_run and not torch.cuda.is_available():
        print("no GPU: run with --dry-run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    part = Part(args.part, args.out, args.dry_run)
    try:
        globals()[f"part_{args.part}"](part, device, args.dry_run)
    except Exception as e:  # recorded, then re-raised: the part fails, what it measured stays
        part.set(error=f"{type(e).__name__}: {e}"[:2000])
        raise
    part.set(finished=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
