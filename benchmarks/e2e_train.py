"""End to end: train a two-class ResNet-34 image classifier (cats vs dogs style: one subfolder per
class) with stock and fused blocks from the same initial weights on the same batches, and compare
loss curves, images/s and held-out accuracy; write a predictions CSV like the one such a user
submits (id, probability of the second class) and, with matplotlib, a loss-overlay PNG.

    python benchmarks/e2e_train.py [--data DIR] [--steps N] [--batch N] [--size S] [--out DIR]

Default data: generated on the fly, no download. Class 0 images are oriented gratings near
horizontal, class 1 near vertical, with random frequency, phase, colour and noise, so the task is
learnable but not trivial. --data DIR reads DIR/<class>/*.jpg|png (Pillow). 20% is held out.
Training augmentation: random-resized-crop to S and horizontal flip, as torchvision's recipe.
"""
import argparse
import csv
import importlib.util
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import fusedres

from common import model_factory

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class SyntheticTwoClass:
    """Deterministic images: item i is drawn from a generator seeded with i."""

    classes = ("cat", "dog")

    def __init__(self, count: int, size: int):
        self.count, self.size = count, size

    def __len__(self):
        return self.count

    def item(self, i: int):
        g = torch.Generator().manual_seed(1000 + i)
        label = i % 2
        s = self.size
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")
        angle = (torch.rand((), generator=g) - 0.5) * 0.8 + (math.pi / 2 if label else 0.0)
        freq = 3 + 6 * torch.rand((), generator=g)
        phase = 2 * math.pi * torch.rand((), generator=g)
        wave = torch.sin(freq * math.pi * (xx * torch.sin(angle) + yy * torch.cos(angle)) + phase)
        colour = torch.rand(3, 1, 1, generator=g)
        img = 0.5 + 0.35 * wave[None] * colour + 0.15 * torch.randn(3, s, s, generator=g)
        return img.clamp(0, 1), label


class ImageFolderData:
    """DIR/<class>/<image>: decoded with Pillow, resized so the short side is `size`."""

    def __init__(self, root: str, size: int):
        if importlib.util.find_spec("PIL") is None:
            raise SystemExit("e2e_train: --data needs Pillow (pip install pillow)")
        self.classes = tuple(sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))))
        if len(self.classes) < 2:
            raise SystemExit(f"e2e_train: --data {root} needs one subfolder per class, found {self.classes}")
        self.files = [(os.path.join(root, c, f), k) for k, c in enumerate(self.classes)
                      for f in sorted(os.listdir(os.path.join(root, c)))
                      if f.lower().endswith((".jpg", ".jpeg", ".png"))]
        self.size = size

    def __len__(self):
        return len(self.files)

    def item(self, i: int):
        from PIL import Image

        path, label = self.files[i]
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = self.size / min(w, h)
            im = im.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))))
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            img = data.view(im.size[1], im.size[0], 3).permute(2, 0, 1).float() / 255
        return img, label


def random_resized_crop_flip(img: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)) + RandomHorizontalFlip."""
    _, h, w = img.shape
    area = h * w
    for _ in range(10):
        target = area * (0.08 + 0.92 * torch.rand((), generator=g).item())
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand((), generator=g).item())
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=g))
            left = int(torch.randint(0, w - cw + 1, (), generator=g))
            break
    else:
        ch, cw, top, left = h, w, 0, 0
    crop = F.interpolate(img[None, :, top:top + ch, left:left + cw], size=(size, size), mode="bilinear",
                         align_corners=False)[0]
    if torch.rand((), generator=g).item() < 0.5:
        crop = crop.flip(-1)
    return crop


def center(img: torch.Tensor, size: int) -> torch.Tensor:
    _, h, w = img.shape
    top, left = (h - min(h, w)) // 2, (w - min(h, w)) // 2
    s = min(h, w)
    return F.interpolate(img[None, :, top:top + s, left:left + s], size=(size, size), mode="bilinear",
                         align_corners=False)[0]


def batches(data, indices, batch, size, steps, seed, device):
    """`steps` augmented training batches, the same for every call with the same seed."""
    g = torch.Generator().manual_seed(seed)
    order = []
    for _ in range(steps):
        if len(order) < batch:
            order += [indices[int(j)] for j in torch.randperm(len(indices), generator=g)]
        chosen, order = order[:batch], order[batch:]
        imgs, labels = zip(*(data.item(i) for i in chosen))
        x = torch.stack([random_resized_crop_flip(im, size, g) for im in imgs])
        x = ((x - IMAGENET_MEAN) / IMAGENET_STD).to(device).contiguous(memory_format=torch.channels_last)
        yield x, torch.tensor(labels, device=device)


def train(model, data, indices, args, device, dtype):
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.2)
    losses, seen, timed = [], 0, 0.0
    model.train()
    for step, (x, y) in enumerate(batches(data, indices, args.batch, args.size, args.steps, args.seed, device)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= min(5, args.steps // 4):  # after warm-up (autotuning, allocator)
            timed += time.perf_counter() - t0
            seen += x.shape[0]
        losses.append(loss.item())
    return losses, seen / timed if timed else None


@torch.no_grad()
def predict(model, data, indices, size, device, dtype):
    model.eval()
    probs = []
    for i in range(0, len(indices), 64):
        chunk = indices[i:i + 64]
        x = torch.stack([center(data.item(j)[0], size) for j in chunk])
        x = ((x - IMAGENET_MEAN) / IMAGENET_STD).to(device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            probs.append(model(x).float().softmax(1)[:, 1].cpu())
    return torch.cat(probs)


def _smooth(values, window=10):
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1):i + 1]
        out.append(sum(part) / len(part))
    return out


def run(args, device) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    data = ImageFolderData(args.data, args.size) if args.data else SyntheticTwoClass(args.images, args.size + args.size // 7)
    idx = list(range(len(data)))
    held = [i for i in idx if i % 10 in (0, 5)]  # 20%, both parities (the synthetic label is i % 2)
    train_idx = [i for i in idx if i % 10 not in (0, 5)]
    factory, source = model_factory(args.arch)
    torch.manual_seed(args.seed)
    stock = factory(num_classes=len(data.classes)).to(device, memory_format=torch.channels_last)
    fused = fusedres.fuse(stock)  # a deep copy: the same initial weights
    result = dict(arch=args.arch, source=source, data=args.data or "synthetic two-class gratings", steps=args.steps,
                  batch=args.batch, size=args.size, dtype=args.dtype, train_images=len(train_idx),
                  held_out=len(held), fused_blocks=len(fusedres.fuse_report(fused).swapped))
    for name, model in (("stock", stock), ("fusedres", fused)):
        losses, ips = train(model, data, train_idx, args, device, dtype)
        probs = predict(model, data, held, args.size, device, dtype)
        labels = torch.tensor([data.item(i)[1] for i in held])
        result[name] = dict(losses=losses, images_per_s=ips,
                            held_out_accuracy=((probs > 0.5).long() == labels).float().mean().item())
        if name == "fusedres":
            path = os.path.join(args.out, "predictions.csv")
            os.makedirs(args.out, exist_ok=True)
            with open(path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["id", f"p_{data.classes[1]}"])
                for i, p in zip(held, probs.tolist()):
                    w.writerow([i, f"{p:.6f}"])
            result["predictions_csv"] = path
    a, b = _smooth(result["stock"]["losses"]), _smooth(result["fusedres"]["losses"])
    result["smoothed_loss_max_abs_diff"] = max(abs(u - v) for u, v in zip(a, b))
    result["final_smoothed_loss"] = dict(stock=a[-1], fusedres=b[-1])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(result["stock"]["losses"], alpha=0.3, color="C0")
        ax.plot(result["fusedres"]["losses"], alpha=0.3, color="C1")
        ax.plot(a, color="C0", label=f"stock ({source})")
        ax.plot(b, color="C1", label="fusedres.fuse")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(f"{args.arch}, {result['data']}, batch {args.batch}, {args.dtype}")
        ax.legend()
        fig.tight_layout()
        result["loss_plot"] = os.path.join(args.out, "e2e_loss.png")
        fig.savefig(result["loss_plot"], dpi=120)
        plt.close(fig)
    except ImportError:
        result["loss_plot"] = None  # matplotlib not installed: the curves are in the JSON
    return result


def parser(gpu: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a folder with one subfolder of images per class")
    p.add_argument("--arch", default="resnet34")
    p.add_argument("--steps", type=int, default=300 if gpu else 30)
    p.add_argument("--batch", type=int, default=64 if gpu else 8)
    p.add_argument("--size", type=int, default=224 if gpu else 64)
    p.add_argument("--images", type=int, default=2000 if gpu else 400, help="synthetic data set size")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--dtype", default="bf16" if gpu else "fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join("benchmarks", "out", "e2e"))
    return p


def main(argv=None) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = parser(device.type == "cuda").parse_args(argv)
    result = run(args, device)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "e2e.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k not in ("stock", "fusedres")}, indent=1))
    for name in ("stock", "fusedres"):
        r = result[name]
        print(f"{name}: images/s {r['images_per_s']:.1f}, held-out accuracy {r['held_out_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
