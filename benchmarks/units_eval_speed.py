"""Eval speed of fused against stock for the BN CNN families beyond ResNet, on the CPU: torchvision
models at 224x224, float32 channels_last, batch 1 and 8, fused and stock interleaved in one
process (5 rounds of 5 timed forwards each, after 3 warm-up forwards; medians). A quick check
until issue 24's side-by-side suite covers these families, training included.

    python benchmarks/units_eval_speed.py [mobilenet_v2,efficientnet_b0,timm:regnety_008,...]

(`timm:NAME`: timm's model of that name.)
"""
import sys
import time

import torch
import torchvision

import fusedres


def median_ms(module, x, reps):
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        module(x)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3


def main(names):
    torch.manual_seed(0)
    for name in names:
        if name.startswith("timm:"):
            import timm

            stock = timm.create_model(name[5:], pretrained=False, num_classes=1000)
        else:
            stock = getattr(torchvision.models, name)(num_classes=1000)
        stock = stock.eval().to(memory_format=torch.channels_last)
        fused = fusedres.fuse(stock)
        for batch in (1, 8):
            x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                for _ in range(3):
                    stock(x), fused(x)
                rounds_stock, rounds_fused = [], []
                for _ in range(5):
                    rounds_stock.append(median_ms(stock, x, 5))
                    rounds_fused.append(median_ms(fused, x, 5))
            s, f = sorted(rounds_stock)[2], sorted(rounds_fused)[2]
            print(f"{name} eval batch {batch}: stock {s:.1f} ms, fused {f:.1f} ms, ratio {f / s:.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else ["mobilenet_v2", "efficientnet_b0", "regnet_y_400mf"])
