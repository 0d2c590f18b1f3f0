"""The main job: correctness of every fused block, then benchmark tables, then where the files went.

    python benchmarks/report.py [--suites overhead,stats,bn_act,conv,blocks,dense,models,memory,e2e] [--dtypes bf16,fp32] [--batch N]
                               [--out DIR] [--quick] [--compile / --no-compile]
                               [--compile-mode default|max-autotune]

On the CPU it runs small sizes (and the C++ kernels; the Triton interpreter is no benchmark); on a
GPU the full ResNet-50 sizes at batch 256 with the CUDA and Triton kernels, torch.compile included.
The CPU models suite is real ResNet-50, MobileNetV2, EfficientNet-B0 and RegNetY-800MF in float32
on torch's threads, every variant (stock eager,
stock torch.compile, ONNX Runtime, fusedres, fusedres + torch.compile) interleaved in one process:
eval at batch 1 and 8 (224x224), train step at batch 8 (112x112); torch.compile on unless
--no-compile (bench_models.run_cpu).
"""
import argparse
import copy
import datetime
import os
import statistics
import sys

import torch

import bench_blocks
import bench_overhead
import bench_bn_act
import bench_bn_stats
import bench_conv
import bench_dense
import bench_memory
import bench_models
import e2e_train
from common import copy_bandwidth_gbps, environment, matmul_tflops, table, write_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _rel_errors(actual, expected):
    """(L2 error / L2 norm, max error / max magnitude) of actual against a float64 expected."""
    diff = actual.double() - expected
    return (diff.norm() / expected.norm()).item(), (diff.abs().max() / expected.abs().max()).item()


def correctness(device, dtypes):
    """Error of each fused block and of the stock block against the stock block in float64 (train
    forward + input gradient), per dtype and memory format (on a GPU, channels_last runs the
    fused-conv chain, NCHW the core path). `ok`: ours at most 2x stock's (the worse of stock's two
    memory formats), judged on the L2-relative error; the max-relative error is listed too.

    Each figure is the median over 3 fixed-seed inputs. Why L2, and why the median: a ReLU input
    within rounding of 0 may fall on the other side
    of the mask than in float64, and the input gradient then legitimately differs by O(1) there.
    With fresh random inputs about 1 float32 run in 100 hits that (measured: 4 of 300 runs of the
    first block on the CPU; stock float32 as far off as ours, 0.358 of the largest gradient on one
    such input), and in bfloat16 almost every run does, for stock and fused alike (max-relative
    errors ~0.3); the L2 error of a few flipped elements stays small, and a single float32 flip
    (3.7e-4 L2 on a ResNeXt block once, 6e-7 otherwise) is outvoted by the other two inputs."""
    rows = []
    for case, (name, stock, fused_cls, shape) in enumerate(bench_blocks.block_cases(small=True)):
        for dtype in dtypes:
            for fmt_name, fmt in (("channels_last", torch.channels_last), ("nchw", torch.contiguous_format)):
                runs = {"fusedres": [], "stock": []}
                for seed in range(3):  # the median of 3 inputs: one flipped mask does not decide
                    torch.manual_seed(1000 + 10 * case + seed)
                    ref64 = copy.deepcopy(stock).to(device, torch.float64)
                    fused = fused_cls.from_module(copy.deepcopy(stock).to(device, memory_format=fmt))
                    stock_m = copy.deepcopy(stock).to(device, memory_format=fmt)
                    x = torch.randn(4, *shape, device=device).contiguous(memory_format=fmt)
                    x64 = x.double().requires_grad_()
                    y64 = ref64(x64)
                    y64.sum().backward()
                    for impl, m in (("fusedres", fused), ("stock", stock_m)):
                        xi = x.clone().requires_grad_()
                        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                            y = m(xi)
                        y.float().sum().backward()
                        l2_y, max_y = _rel_errors(y, y64)
                        l2_g, max_g = _rel_errors(xi.grad, x64.grad)
                        runs[impl].append((max(l2_y, l2_g), max(max_y, max_g)))
                errs = {impl: tuple(statistics.median(e[i] for e in v) for i in range(2)) for impl, v in runs.items()}
                rows.append(dict(block=name, dtype=str(dtype).replace("torch.", ""), format=fmt_name,
                                 fused_l2_err=errs["fusedres"][0], stock_l2_err=errs["stock"][0],
                                 fused_max_err=errs["fusedres"][1], stock_max_err=errs["stock"][1]))
    for r in rows:
        # against the worse of stock's two formats: a single flipped mask is as likely in either
        # implementation (measured: one 6-layer dense block in float32 shows the same 2.0e-3 error
        # for stock in NCHW and for fused in channels_last, both ~6e-7 otherwise)
        stock = max(q["stock_l2_err"] for q in rows if q["block"] == r["block"] and q["dtype"] == r["dtype"])
        r["ok"] = r["fused_l2_err"] <= 2 * stock + 1e-6
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", default="overhead,stats,bn_act,conv,blocks,dense,models,memory,e2e")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--batch", type=int, default=None, help="default: 256 on a GPU, 8 on the CPU")
    parser.add_argument("--out", default=os.environ.get("OUT") or None, help="results folder (default benchmarks/out/<date>)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="include torch.compile baselines (default: on a GPU, and in the CPU models suite)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--blocks", default="", help="only the blocks whose name contains this (e.g. resnet50, g32)")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode of the stock baseline (max-autotune tunes for minutes per block)")
    parser.add_argument("--dense-models", default="",
                        help="DenseNets of the dense suite (default: densenet121,169,201 on a GPU, densenet121 on the CPU)")
    parser.add_argument("--dense-batches", default="",
                        help="batch sizes of the dense suite (default: 64,256 on a GPU, 4 on the CPU)")
    parser.add_argument("--models", default="", help="models of the models suite (default: the full list on a GPU, "
                                                       "resnet50, mobilenet_v2, efficientnet_b0, regnet_y_800mf "
                                                       "on the CPU)")
    parser.add_argument("--model-batches", default="", help="batch sizes of the models suite (default: 32,256 on a "
                                                           "GPU; on the CPU the eval batches, 1,8, the train step "
                                                           "being batch 8)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    batch = args.batch or (256 if device.type == "cuda" else 8)
    compile_baseline = args.compile if args.compile is not None else device.type == "cuda"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or os.path.join("benchmarks", "out", stamp)
    suites = args.suites.split(",")

    env = environment()
    print(f"fusedres benchmark report on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
          f"CUDA {env['cuda']}), batch {batch}, dtypes {args.dtypes}", flush=True)

    print("\n== correctness: fused blocks vs stock, error relative to a float64 run (train fwd + input grad)")
    checks = correctness(device, dtypes)
    print(table(checks, ["block", "dtype", "format", "fused_l2_err", "stock_l2_err", "fused_max_err", "stock_max_err",
                         "ok"]), flush=True)

    copy_gbps = copy_bandwidth_gbps(device, args.quick)
    tflops = matmul_tflops(device, args.quick)
    print(f"\n== measured ceilings: copy {copy_gbps:.0f} GB/s (read + write), matmul {tflops:.1f} TFLOP/s", flush=True)

    results = dict(environment=env, batch=batch, ceilings=dict(copy_GBps=copy_gbps, matmul_TFLOPs=tflops),
                   correctness=checks, command=" ".join([sys.executable, os.path.abspath(__file__)] + (argv or sys.argv[1:])))
    if "overhead" in suites:
        rows = bench_overhead.run(device, args.quick)
        results["overhead"] = rows
        print("\n== overhead per block: host microseconds (tiny tensors, one thread) and device launches, "
              "fused vs stock eager (chain on the CPU: launches only, under the interpreter)")
        print(table(rows, bench_overhead.COLUMNS), flush=True)
    if "stats" in suites:
        rows = bench_bn_stats.run(device, dtypes, batch, copy_gbps, args.quick)
        results["bn_stats"] = rows
        print("\n== bn_stats (bytes: one read of x)")
        print(table(rows, ["shape", "dtype", "impl", "ms", "GBps", "pct_copy_bw", "speedup_vs_eager"]), flush=True)
    if "bn_act" in suites:
        rows = bench_bn_act.run(device, dtypes, batch, copy_gbps, args.quick, compile_baseline)
        results["bn_act"] = rows
        print("\n== normalize-activate (bytes: the fewest a fused pass must move)")
        print(table(rows, ["op", "shape", "dtype", "impl", "ms", "GBps", "pct_copy_bw", "speedup_vs_eager"]), flush=True)
    if "conv" in suites:
        if device.type == "cuda":
            rows = bench_conv.run(device, dtypes, batch, tflops, args.quick)
            results["conv"] = rows
            results["conv_summary"] = bench_conv.summary(rows)
            from fusedres.kernels.conv_triton import tuned_configs

            results["conv_tuned_configs"] = {str(k): v for k, v in tuned_configs().items()}
            print("\n== conv kernels vs cuDNN (channels_last, no fusion), every distinct ResNet-50 / ResNeXt-50 conv")
            print(table(rows, ["arch", "conv", "x", "w", "stride", "groups", "dtype", "kind", "TFLOPs_cudnn",
                               "TFLOPs_fusedres", "pct_matmul_peak", "speedup_vs_cudnn"]), flush=True)
            print(table(results["conv_summary"], ["dtype", "kind", "convs", "count", "geomean_speedup_vs_cudnn",
                                                  "worst", "worst_speedup"]), flush=True)
        else:
            print("\n== conv kernels: skipped, the Triton conv kernels need a GPU (the interpreter is no benchmark)")
    if "blocks" in suites:
        rows = bench_blocks.run(device, dtypes, batch, args.quick, compile_baseline, args.compile_mode, args.blocks,
                                progress=lambda m: print(m, file=sys.stderr, flush=True))
        results["blocks"] = rows
        print("\n== blocks (same weights; train = fwd + bwd)")
        print(table(rows, ["block", "mode", "dtype", "impl", "ms", "speedup_vs_eager", "peak_MB", "note"]), flush=True)

    if "dense" in suites:
        small = device.type == "cpu"
        archs = tuple(a for a in args.dense_models.split(",") if a) or None
        batches = [int(b) for b in args.dense_batches.split(",") if b] or ([4] if small else [64, 256])
        rows = bench_dense.run(device, dtypes, batches, args.quick, compile_baseline, args.compile_mode, archs,
                               image_size=64 if small else 224,
                               progress=lambda m: print(m, file=sys.stderr, flush=True))
        results["dense"] = rows
        print(f"\n== DenseNet training step (fwd + bwd + SGD), {64 if small else 224}x{64 if small else 224}, "
              "channels_last; targets: time <= 0.9x memory_efficient=False, memory <= memory_efficient=True")
        print(table(rows, ["model", "dtype", "batch", "impl", "ms", "images_per_s", "time_vs_stock", "peak_MB",
                           "saved_MB", "memory_vs_memory_efficient"]), flush=True)

    if "models" in suites and device.type == "cpu":
        # every variant side by side in one process, interleaved; torch.compile on unless --no-compile
        archs = tuple(a for a in args.models.split(",") if a) or None
        batches = [int(b) for b in args.model_batches.split(",") if b] or [1, 8]
        compile_models = args.compile if args.compile is not None else True
        cpu = bench_models.run_cpu(archs, eval_batches=batches, train_batch=8, quick=args.quick,
                                   compile_variants=compile_models, compile_mode=args.compile_mode,
                                   progress=lambda m: print(m, file=sys.stderr, flush=True))
        rows = cpu["rows"]
        results["models"] = rows
        results["models_cpu"] = cpu["info"]
        info = cpu["info"]
        print(f"\n== models (CPU, {info['threads']} threads, float32, channels_last, variants interleaved in "
              f"{info['rounds']} rounds): eval (no_grad) at {info['eval_size']}x{info['eval_size']}, train step "
              f"(fwd + bwd + SGD) at {info['train_size']}x{info['train_size']}; median ms per call, "
              "x = stock eager ms / variant ms")
        print(bench_models.cpu_table(rows), flush=True)
        print(table(rows, ["model", "mode", "batch", "impl", "ms", "speedup_vs_eager", "calls", "build_s", "warmup_s",
                           "max_abs_diff", "ref_max_abs", "grad_max_abs_diff", "ref_grad_max_abs", "note"]), flush=True)
        print(f"fusedres backends: {cpu['info']['fusedres_backends']}", flush=True)
        print("load average (1, 5, 15 min) before / after: "
              f"{', '.join(f'{v:.2f}' for v in cpu['info']['loadavg_before'])} / "
              f"{', '.join(f'{v:.2f}' for v in cpu['info']['loadavg_after'])} (above the thread count: other "
              "processes competed for the cores, and torch's OpenMP threads slow down far more than in proportion)",
              flush=True)
    elif "models" in suites:
        archs = tuple(a for a in args.models.split(",") if a) or None
        batches = [int(b) for b in args.model_batches.split(",") if b] or [32, 256]
        size = 224
        rows = bench_models.run(device, dtypes, batches, args.quick, compile_baseline, args.compile_mode, archs,
                                image_size=size, progress=lambda m: print(m, file=sys.stderr, flush=True))
        results["models"] = rows
        print(f"\n== models: train step (fwd + bwd + SGD) and inference, {size}x{size}, channels_last")
        print(table(rows, ["model", "mode", "dtype", "batch", "impl", "ms", "images_per_s", "speedup_vs_eager",
                           "peak_MB", "memory_vs_eager"]), flush=True)

    if "memory" in suites:
        memory = bench_memory.run(out, args.quick, progress=lambda m: print(m, file=sys.stderr, flush=True))
        results["memory"] = memory
        print("\n== memory (issue 25): bytes kept for backward after one training forward, batch 8, 112x112, "
              "float32 channels_last (fusedres.memory_report; fused path = what a GPU runs; cpu_default_ratio: "
              "what the CPU's measured choice runs); then CPU train-step time, interleaved")
        print(bench_memory.tables(memory), flush=True)

    if "e2e" in suites:
        e2e_args = e2e_train.parser(device.type == "cuda").parse_args(["--out", out])
        e2e = e2e_train.run(e2e_args, device)
        results["e2e"] = e2e
        print(f"\n== end to end: {e2e['arch']} two-class classifier, {e2e['data']}, {e2e['steps']} steps, batch "
              f"{e2e['batch']}, {e2e['size']}x{e2e['size']}, {e2e['dtype']}, same initial weights and batches")
        runs = [k for k in ("stock", "fusedres", "stock_float64") if k in e2e]
        gaps = e2e.get("max_abs_loss_gap_to_float64", {})
        print(table([dict(impl=k, images_per_s=e2e[k]["images_per_s"], final_loss=e2e[k]["losses"][-1],
                          max_abs_loss_gap_to_float64=gaps.get(k), held_out_accuracy=e2e[k]["held_out_accuracy"])
                     for k in runs], ["impl", "images_per_s", "final_loss", "max_abs_loss_gap_to_float64",
                                      "held_out_accuracy"]))
        if "fused_gap_vs_stock_gap" in e2e:
            print(f"fused run's largest distance from the float64 run / stock's: {e2e['fused_gap_vs_stock_gap']:.2f} "
                  f"(about 1: the fused model tracks float64 as closely as stock does)")
        print(f"data: {e2e['loader']}; predictions: {e2e['predictions_csv']}; loss plot: "
              f"{e2e['loss_plot'] or 'none (matplotlib not installed)'}", flush=True)

    path = os.path.join(out, f"report_{device.type}_{stamp}.json")
    write_json(path, results)
    print(f"\nresults written to {path}")
    try:
        import plots

        for png in plots.plot(results, out):
            print(f"plot: {png}")
    except ImportError:
        print("plots skipped: matplotlib is not installed (every figure is in the JSON)")
    if not all(r["ok"] for r in checks):
        print("CORRECTNESS CHECK FAILED for: " + ", ".join(f"{r['block']} {r['dtype']} {r['format']}"
                                                          for r in checks if not r["ok"]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
