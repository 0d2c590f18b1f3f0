"""Models: whole-model training step (fwd + bwd + SGD step) and inference throughput in images/s,
with peak memory, for stock eager, stock torch.compile, fused eager (fusedres.fuse) and fused +
torch.compile, in one run, channels_last.

GPU (run): resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d, wide_resnet50_2 and
densenet121 at 224x224 (torchvision's models when it imports).

CPU (run_cpu): real ResNet-50, MobileNetV2, EfficientNet-B0 and RegNetY-800MF (torchvision's) in
float32, channels_last, on torch.get_num_threads() threads, with
every variant side by side in one process: stock eager, stock torch.compile, ONNX Runtime
(CPUExecutionProvider; eval only, and only where onnxruntime and onnx import), fusedres eager and
fusedres + torch.compile; eval (torch.no_grad) at batch 1 and 8, 224x224, and a train step at
batch 8, 112x112. All variants are built and warmed up first (compile and export seconds
recorded), then timed in interleaved rounds (each round runs every variant's block of calls in
turn, the starting variant rotating), so that noise on a shared CPU hits all alike; per variant
the median per-call time, and its ratio to stock eager from the same run. Each variant's output
is checked against stock eager's (max abs difference in the row).
"""
import copy
import gc
import io
import math
import os
import statistics
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch

import fusedres

from common import bench, environment, model_factory, peak_mb, train_step

GPU_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
              "resnext101_32x8d", "wide_resnet50_2", "densenet121")
CPU_MODELS = ("resnet18", "resnet50")
# run_cpu's default: issue 24's families side by side (ResNet, inverted residuals with SiLU and
# squeeze-excitation, RegNet's grouped convs with squeeze-excitation)
CPU_SUITE_MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0", "regnet_y_800mf")


def default_cpu_models() -> tuple:
    """CPU_SUITE_MODELS that this environment can build: all four where torchvision imports, else
    ResNet-50 (fusedres.models holds the ResNet and DenseNet architectures only)."""
    buildable = []
    for arch in CPU_SUITE_MODELS:
        try:
            model_factory(arch)
        except AttributeError:
            continue
        buildable.append(arch)
    return tuple(buildable)


def _infer(model, x, dtype, device):
    def step():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            model(x)

    return step


def run(device: torch.device, dtypes, batches, quick: bool, compile_baseline: bool, compile_mode: str = "default",
        archs=None, image_size: int = 224, progress=print) -> List[Dict[str, object]]:
    archs = archs or (CPU_MODELS if device.type == "cpu" else GPU_MODELS)
    rows = []
    for arch in archs:
        factory, source = model_factory(arch)
        for dtype in dtypes:
            for batch in batches:
                torch.manual_seed(0)
                base = factory(num_classes=100).to(device, memory_format=torch.channels_last)
                impls = {f"{source} eager": lambda: copy.deepcopy(base), "fusedres": lambda: fusedres.fuse(base)}
                if compile_baseline:
                    impls[f"{source} torch.compile({compile_mode})"] = lambda: torch.compile(
                        copy.deepcopy(base), mode=compile_mode)
                    impls[f"fusedres + torch.compile({compile_mode})"] = lambda: torch.compile(
                        fusedres.fuse(base), mode=compile_mode)
                xs = [torch.randn(batch, 3, image_size, image_size, device=device).contiguous(
                    memory_format=torch.channels_last) for _ in range(2)]
                labels = torch.randint(0, 100, (batch,), device=device)
                reference = {}
                for impl, make in impls.items():
                    progress(f"  models: {arch} {str(dtype)[6:]} batch {batch}: {impl}")
                    model = make()
                    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                    for mode in ("train", "eval"):
                        model.train(mode == "train")
                        if mode == "train":
                            fn = lambda i, m=model, o=opt: train_step(m, o, xs[i], labels, dtype, device)[1]  # noqa: E731
                        else:
                            fn = lambda i, m=model: _infer(m, xs[i], dtype, device)  # noqa: E731
                        try:
                            ms = bench(fn, len(xs), device, quick)
                        except torch.cuda.OutOfMemoryError:
                            rows.append(dict(model=arch, mode=mode, impl=impl, dtype=str(dtype)[6:], batch=batch,
                                             note="out of memory"))
                            torch.cuda.empty_cache()
                            continue
                        peak = peak_mb(device, fn(0))
                        reference.setdefault(mode, (ms, peak))
                        ref_ms, ref_peak = reference[mode]
                        rows.append(dict(model=arch, mode=mode, impl=impl, dtype=str(dtype)[6:], batch=batch, ms=ms,
                                         images_per_s=batch / (ms * 1e-3), speedup_vs_eager=ref_ms / ms,
                                         peak_MB=peak, memory_vs_eager=(peak / ref_peak) if peak and ref_peak else None))
                    opt.zero_grad(set_to_none=True)
                    del model, opt
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# CPU: every variant side by side in one process, timed in interleaved rounds


def _max_abs_diff(a, b) -> float:
    a = torch.as_tensor(a).detach().float().cpu()
    b = torch.as_tensor(b).detach().float().cpu()
    return (a - b).abs().max().item()


def _onnxruntime_session(model: torch.nn.Module, example: torch.Tensor, threads: int):
    """(ONNX Runtime session of model's eval forward with a dynamic batch, export seconds,
    versions); raises where onnxruntime/onnx do not import or the export fails."""
    import onnx  # noqa: F401  (the exporter's dependency; a missing one is said in the row)
    import onnxruntime as ort

    t0 = time.perf_counter()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(model).eval(), (example,), buffer, dynamo=False, input_names=["x"],
                          output_names=["y"], opset_version=17,
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    export_s = time.perf_counter() - t0
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's pool threads otherwise spin on after a run and take the cores from whatever runs next
    # (measured on 2 cores: stock eager ResNet-50 batch 1 right after an ORT call 140 ms with
    # spinning, 85 ms without; ORT's own call 55-60 ms either way)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    return session, export_s, dict(onnxruntime=ort.__version__, onnx=onnx.__version__,
                                   providers=session.get_providers(), onnx_bytes=len(buffer.getvalue()),
                                   intra_op_num_threads=threads, allow_spinning=False)


def _interleaved(calls: Dict[str, List[Callable[[], object]]], rounds: int,
                 per_round: int) -> Dict[str, List[float]]:
    """Per-call milliseconds of each variant: `rounds` rounds, each running every variant's
    `per_round` calls in turn (the first variant of a round rotating), each variant rotating over
    its own list of calls (one per prepared input)."""
    names = list(calls)
    times = {n: [] for n in names}
    count = {n: 0 for n in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                fns = calls[name]
                for _ in range(per_round):
                    fn = fns[count[name] % len(fns)]
                    count[name] += 1
                    t0 = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def _cpu_model() -> str:
    """The CPU's model name and vector extensions (what oneDNN and MLAS pick their kernels by)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(isa)})"


def run_cpu(archs: Optional[Sequence[str]] = None, eval_batches: Sequence[int] = (1, 8), train_batch: int = 8,
            eval_size: int = 224, train_size: int = 112, quick: bool = False, compile_variants: bool = True,
            compile_mode: str = "default", onnx: bool = True, rounds: Optional[int] = None,
            n_inputs: int = 3, progress=print) -> Dict[str, object]:
    """The CPU models suite: {"rows": one row per (model, mode, batch, variant), "info": what the
    run used}. See the module docstring; float32, channels_last, torch.get_num_threads() threads.

    Each compiled variant is one torch.compile'd module (dynamic=False: each timed shape gets its
    own static graph, so it recompiles once per eval batch and once for train mode); the first
    call's seconds (compile included) are the row's warmup_s. Rows whose ms is missing have a note
    saying why. quick: 3 rounds instead of 10, one warm-up call less, and each variant's share of a
    round about 0.15 s of calls instead of 0.3 s."""
    device = torch.device("cpu")
    archs = tuple(archs or default_cpu_models())
    threads = torch.get_num_threads()
    rounds = rounds or (3 if quick else 10)
    extra_warmup = 1 if quick else 2  # untimed calls after the first (compiling) one
    block_s = 0.15 if quick else 0.3  # each variant's share of a round: calls of about this many seconds
    info = dict(threads=threads, torch=torch.__version__, dtype="float32", memory_format="channels_last",
                rounds=rounds, inputs=n_inputs, eval_batches=list(eval_batches), eval_size=eval_size,
                train_batch=train_batch, train_size=train_size,
                compile=dict(enabled=compile_variants, mode=compile_mode, dynamic=False),
                fusedres_backends=fusedres.backends(), timing="median per-call ms over interleaved rounds",
                models={}, loadavg_before=os.getloadavg(), environment=environment(),
                cpu_model=_cpu_model())  # other processes' load makes torch's threads wait
    rows: List[Dict[str, object]] = []
    modes = [("eval", b, eval_size) for b in eval_batches]
    if train_batch:
        modes.append(("train", train_batch, train_size))

    for arch in archs:
        factory, source = model_factory(arch)
        torch.manual_seed(0)
        base = factory().to(device, memory_format=torch.channels_last).eval()
        stock_name = f"{source} eager"
        compiled_name = f"{source} torch.compile({compile_mode})"
        ort_name = "onnxruntime (CPUExecutionProvider)"
        fused_name, fused_compiled_name = "fusedres", f"fusedres + torch.compile({compile_mode})"
        arch_info = dict(source=source)
        info["models"][arch] = arch_info

        # -- build every variant first
        variants: Dict[str, object] = {}   # name -> nn.Module (or an ORT session)
        missing: Dict[str, str] = {}       # name -> why it has no figures
        build_s: Dict[str, float] = {}
        variants[stock_name] = base
        if compile_variants:
            variants[compiled_name] = torch.compile(copy.deepcopy(base), mode=compile_mode, dynamic=False)
        else:
            missing[compiled_name] = "torch.compile off (--no-compile)"
        if onnx:
            progress(f"  models (cpu): {arch}: exporting to ONNX")
            try:
                example = torch.randn(1, 3, eval_size, eval_size).contiguous(memory_format=torch.channels_last)
                session, build_s[ort_name], arch_info["onnxruntime"] = _onnxruntime_session(base, example, threads)
                variants[ort_name] = session
            except ImportError as e:
                missing[ort_name] = f"not run: {e} (pip install onnxruntime onnx)"
            except Exception as e:  # noqa: BLE001 - an export failure is a row, not a failed report
                missing[ort_name] = f"ONNX export / session failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        else:
            missing[ort_name] = "ONNX Runtime off"
        t0 = time.perf_counter()
        fused = fusedres.fuse(copy.deepcopy(base))
        build_s[fused_name] = time.perf_counter() - t0
        report = fusedres.fuse_report(fused)
        arch_info["fuse_report"] = f"{len(report.swapped)} swapped, {len(report.left)} left"
        variants[fused_name] = fused
        if compile_variants:
            variants[fused_compiled_name] = torch.compile(copy.deepcopy(fused), mode=compile_mode, dynamic=False)
        else:
            missing[fused_compiled_name] = "torch.compile off (--no-compile)"
        order = [stock_name, compiled_name, ort_name, fused_name, fused_compiled_name]
        backends = info["fusedres_backends"]
        cpu_backends = ",".join(k for k, v in backends.items() if isinstance(v, dict) and v.get("cpu") is True)
        cpu_backends += f" (selected: {backends.get('selected')})"
        optimizers = {n: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
                      for n, m in variants.items() if isinstance(m, torch.nn.Module)}

        for mode, batch, size in modes:
            gen = torch.Generator().manual_seed(1000 + batch)
            xs = [torch.randn(batch, 3, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
                  for _ in range(n_inputs)]
            labels = [torch.randint(0, 1000, (batch,), generator=gen) for _ in range(n_inputs)]
            xs_np = [x.contiguous().numpy() for x in xs]  # ORT: a contiguous NCHW array
            calls: Dict[str, List[Callable[[], object]]] = {}
            row_of: Dict[str, Dict[str, object]] = {}
            reference = {}

            def new_row(name, **kw):
                row = dict(model=arch, mode=mode, impl=name, dtype="float32", batch=batch, size=size, threads=threads,
                           ms=None, images_per_s=None, speedup_vs_eager=None, peak_MB=None, memory_vs_eager=None,
                           build_s=build_s.get(name), warmup_s=None, max_abs_diff=None, note=None)
                row.update(kw)
                row_of[name] = row
                return row

            for name in order:
                if name in missing:
                    new_row(name, note=missing[name])
                    continue
                if mode == "train" and name == ort_name:
                    new_row(name, note="eval only (no training in ONNX Runtime here)")
                    continue
                m = variants[name]
                row = new_row(name)
                if name in (fused_name, fused_compiled_name):
                    row["fusedres_cpu_backends"] = cpu_backends
                progress(f"  models (cpu): {arch} {mode} batch {batch} {size}x{size}: warming up {name}")
                try:
                    if name == ort_name:
                        calls[name] = [lambda s=m, a=a: s.run(None, {"x": a}) for a in xs_np]
                        t0 = time.perf_counter()
                        out = torch.from_numpy(m.run(None, {"x": xs_np[0]})[0])
                        row["warmup_s"] = time.perf_counter() - t0
                        row["max_abs_diff"] = _max_abs_diff(out, reference["out"])
                    elif mode == "eval":
                        m.eval()

                        def infer(m=m, x=None):
                            with torch.no_grad():
                                return m(x)

                        calls[name] = [lambda f=infer, x=x: f(x=x) for x in xs]
                        t0 = time.perf_counter()
                        out = infer(x=xs[0])
                        row["warmup_s"] = time.perf_counter() - t0
                        if name == stock_name:
                            reference.update(out=out, out_max_abs=out.abs().max().item())
                        row["max_abs_diff"] = _max_abs_diff(out, reference["out"])
                    else:
                        m.train()
                        opt = optimizers[name]
                        calls[name] = [train_step(m, opt, x, y, torch.float32, device)[1] for x, y in zip(xs, labels)]
                        # the first step by hand, to check its loss and gradients against stock's
                        # (every variant starts from the same weights: eval changed none)
                        t0 = time.perf_counter()
                        logits = m(xs[0])
                        loss = torch.nn.functional.cross_entropy(logits.float(), labels[0])
                        loss.backward()
                        grads = {k: p.grad.detach().clone() for k, p in
                                 getattr(m, "_orig_mod", m).named_parameters() if p.grad is not None}
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        row["warmup_s"] = time.perf_counter() - t0
                        if name == stock_name:
                            reference.update(out=logits.detach(), out_max_abs=logits.abs().max().item(),
                                             loss=loss.item(), grads=grads,
                                             grad_max_abs=max(g.abs().max().item() for g in grads.values()))
                        row["max_abs_diff"] = _max_abs_diff(logits, reference["out"])
                        row["loss_diff"] = abs(loss.item() - reference["loss"])
                        shared = [k for k in reference["grads"] if k in grads]
                        diffs = {k: _max_abs_diff(grads[k], reference["grads"][k]) for k in shared}
                        if diffs:
                            worst = max(diffs, key=diffs.get)
                            row.update(grad_max_abs_diff=diffs[worst], grad_worst_param=worst,
                                       ref_grad_max_abs=reference["grad_max_abs"],
                                       ref_worst_param_grad_max_abs=reference["grads"][worst].abs().max().item())
                        if len(shared) != len(reference["grads"]):
                            row["note"] = f"gradients compared on {len(shared)} of {len(reference['grads'])} parameters"
                    row["ref_max_abs"] = reference["out_max_abs"]
                    for i in range(extra_warmup):
                        calls[name][(i + 1) % len(calls[name])]()
                except Exception as e:  # noqa: BLE001 - a failing variant is a row, not a failed report
                    calls.pop(name, None)
                    row.update(note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                               max_abs_diff=None)
                    if name == stock_name:
                        raise

            # each variant's share of a round: about block_s seconds of stock eager's calls
            t0 = time.perf_counter()
            calls[stock_name][0]()
            per_call = time.perf_counter() - t0
            per_round = max(1, min(8, math.ceil(block_s / per_call)))
            progress(f"  models (cpu): {arch} {mode} batch {batch}: {rounds} interleaved rounds x {per_round} calls "
                     f"of {len(calls)} variants")
            times = _interleaved(calls, rounds, per_round)
            stock_ms = statistics.median(times[stock_name])
            for name, ts in times.items():
                ms = statistics.median(ts)
                row_of[name].update(ms=ms, images_per_s=batch / (ms * 1e-3), speedup_vs_eager=stock_ms / ms,
                                    calls=len(ts), ms_min=min(ts), ms_max=max(ts))
            rows.extend(row_of[n] for n in order)
            del calls, xs, xs_np, reference
            gc.collect()
        del variants, optimizers, base, fused
        gc.collect()
    info["loadavg_after"] = os.getloadavg()
    # fusedres's training path per distinct block (fused units or the stock forward, measured)
    info["cpu_train_choices"] = [dict(block=key[0][0], input_shape=list(key[2]), path=c.path, fused_ms=c.fused_ms,
                                      stock_ms=c.stock_ms) for key, c in fusedres.cpu_train_choices().items()]
    return dict(rows=rows, info=info)


def _short(impl: str) -> str:
    """A column name: 'stock eager', 'stock compile', 'onnxruntime', 'fusedres', 'fusedres compile'."""
    impl = impl.replace("torch.compile(default)", "compile").replace("torch.compile", "compile")
    impl = impl.replace("onnxruntime (CPUExecutionProvider)", "onnxruntime").replace("fusedres + ", "fusedres ")
    for source in ("torchvision ", "fusedres.models "):
        if impl.startswith(source):
            impl = "stock " + impl[len(source):]
    return impl


def cpu_table(rows: List[Dict[str, object]]) -> str:
    """run_cpu's rows as one line per (model, mode, batch): per variant its ms and its speedup
    over stock eager (x; > 1 is faster), then the notes of variants without figures."""
    from common import table

    impls = list(dict.fromkeys(r["impl"] for r in rows))
    keys = list(dict.fromkeys((r["model"], r["mode"], r["batch"], r["size"]) for r in rows))
    columns = ["model", "mode", "batch", "size"]
    for impl in impls:
        columns += [f"{_short(impl)} ms", f"{_short(impl)} x"]
    lines = []
    for model, mode, batch, size in keys:
        line = dict(model=model, mode=mode, batch=batch, size=f"{size}x{size}")
        for r in rows:
            if (r["model"], r["mode"], r["batch"], r["size"]) == (model, mode, batch, size):
                line[f"{_short(r['impl'])} ms"] = r["ms"] if r["ms"] is not None else "-"
                line[f"{_short(r['impl'])} x"] = r["speedup_vs_eager"]
        lines.append(line)
    return table(lines, columns)
