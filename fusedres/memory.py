"""fusedres.memory_report(model, example_input): what a training forward keeps for backward, stock
against fused, per fused block or unit and in total.

The measure is the bytes autograd holds for backward after one training forward: every tensor a
Function saves (torch.autograd.graph.saved_tensors_hooks sees each), counted once per storage
(a tensor saved by two Functions, or a view of one saved, costs its memory once), the model's
parameters, buffers and the example input left out (they exist whatever the forward keeps). It
is the same on every device for the same path, so a CPU run tells what a GPU's activation memory
would be (`torch.cuda.max_memory_allocated` adds the allocator's own slack and the transients on
top; benchmarks/gpu_stage1.py measures that where a GPU is lent).

Each saved storage is put on the innermost row module whose forward was running when it was
first saved: the modules fusedres.fuse swapped in (blocks, unit runs, dense blocks), at the same
paths in the stock model, and "(rest)" for everything outside them (a stem's max pool, the head).
"""
import copy
import os
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

from .block_plumbing import forced_train_path
from .dense_modules import FusedDenseLayer
from .fuse import FUSED_TYPES, fuse, unfuse
from .modules import set_memory_efficient

REST = "(rest)"


class MemoryRow(NamedTuple):
    path: str  # the module's path in the model, or REST
    kind: str  # what fusedres runs there (its fused class, and the original's)
    stock_bytes: int
    fused_bytes: int

    @property
    def ratio(self) -> float:
        return self.fused_bytes / self.stock_bytes if self.stock_bytes else float("nan")


class MemoryReport:
    """memory_report's result: rows (MemoryRow per fused module, then REST), totals, as_dict(),
    str() a table, save_png(path) a bar chart (matplotlib)."""

    def __init__(self, name: str, rows: List[MemoryRow], memory_efficient: bool, train_path: Optional[str]):
        self.name = name
        self.rows = rows
        self.memory_efficient = memory_efficient
        self.train_path = train_path

    @property
    def stock_bytes(self) -> int:
        return sum(r.stock_bytes for r in self.rows)

    @property
    def fused_bytes(self) -> int:
        return sum(r.fused_bytes for r in self.rows)

    @property
    def ratio(self) -> float:
        return self.fused_bytes / self.stock_bytes if self.stock_bytes else float("nan")

    def as_dict(self) -> dict:
        return dict(model=self.name, memory_efficient=self.memory_efficient, train_path=self.train_path,
                    stock_bytes=self.stock_bytes, fused_bytes=self.fused_bytes, ratio=self.ratio,
                    rows=[dict(r._asdict(), ratio=r.ratio) for r in self.rows])

    def __str__(self) -> str:
        mib = 1 << 20
        width = max([len(r.path) for r in self.rows] + [5])
        kind_width = max([len(r.kind) for r in self.rows] + [4])
        lines = [f"{self.name}: saved for backward, stock -> fused"
                 f"{' (memory_efficient)' if self.memory_efficient else ''}",
                 f"{'path':<{width}}  {'kind':<{kind_width}}  {'stock MiB':>10}  {'fused MiB':>10}  {'fused/stock':>11}"]
        for r in self.rows:
            lines.append(f"{r.path:<{width}}  {r.kind:<{kind_width}}  {r.stock_bytes / mib:>10.2f}  "
                         f"{r.fused_bytes / mib:>10.2f}  {r.ratio:>10.3f}x")
        lines.append(f"{'total':<{width}}  {'':<{kind_width}}  {self.stock_bytes / mib:>10.2f}  "
                     f"{self.fused_bytes / mib:>10.2f}  {self.ratio:>10.3f}x")
        return "\n".join(lines)

    def save_png(self, path: str) -> str:
        """A horizontal bar chart (stock and fused MiB per row, the total in the title) at `path`."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:  # optional: the table needs nothing
            raise ImportError("fusedres.MemoryReport.save_png needs matplotlib (pip install matplotlib)") from exc
        mib = float(1 << 20)
        labels = [r.path for r in self.rows]
        positions = range(len(self.rows))
        fig, ax = plt.subplots(figsize=(8, 1.5 + 0.28 * len(self.rows)))
        ax.barh([p - 0.2 for p in positions], [r.stock_bytes / mib for r in self.rows], 0.4, label="stock")
        ax.barh([p + 0.2 for p in positions], [r.fused_bytes / mib for r in self.rows], 0.4,
                label="fusedres" + (" memory_efficient" if self.memory_efficient else ""))
        ax.set_yticks(list(positions))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("MiB saved for backward after one training forward")
        ax.set_title(f"{self.name}: {self.stock_bytes / mib:.1f} MiB stock, {self.fused_bytes / mib:.1f} MiB fused "
                     f"({self.ratio:.2f}x)", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, FUSED_TYPES) for m in model.modules())


def _row_paths(fused: nn.Module) -> Dict[str, str]:
    """{path: kind} of every fused module of `fused` but a dense block's own layers (inside its
    row); a storage goes to the innermost (a fused model's own row holds its stem and head)."""
    rows: Dict[str, str] = {}
    for path, m in fused.named_modules():
        if not isinstance(m, FUSED_TYPES) or isinstance(m, FusedDenseLayer):
            continue
        original = m.__dict__.get("original")
        kind = type(m).__name__
        if original is not None and type(original) is not type(m):
            kind = f"{kind}({type(original).__name__})"
        elif hasattr(m, "_fusedres_original_class"):
            kind = f"FusedGraph({m._fusedres_original_class.__name__})"
        rows[path] = kind
    return rows


def saved_bytes_by_path(model: nn.Module, example_input, paths: Sequence[str]) -> Dict[str, int]:
    """{path or REST: bytes} that one training-mode forward of `model` on `example_input` (a
    tensor or a tuple of them) keeps for backward, per storage once, put on the innermost of
    `paths` whose forward was running when it was first saved. The model's parameters, buffers
    and the input are left out. The model runs as it is (its mode, its device); nothing is
    differentiated."""
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    excluded = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    excluded |= {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    found: Dict[int, tuple] = {}
    stack: List[str] = []
    handles = []
    modules = dict(model.named_modules())

    def enter(path):
        def hook(module, args):
            stack.append(path)
        return hook

    def leave(module, args, output):
        stack.pop()

    for path in paths:
        handles.append(modules[path].register_forward_pre_hook(enter(path)))
        handles.append(modules[path].register_forward_hook(leave))

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in excluded and key not in found and storage.nbytes():
            # the storage itself is held (kept alive here too, so no later one reuses its address)
            found[key] = (stack[-1] if stack else REST, storage.nbytes(), storage)
        return t

    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(*inputs)
            del out
    finally:
        for h in handles:
            h.remove()
    totals = {p: 0 for p in list(paths) + [REST]}
    for path, nbytes, _ in found.values():
        totals[path] += nbytes
    return totals


def memory_report(model: nn.Module, example_input, *, memory_efficient: Optional[bool] = None,
                  train_path: Optional[str] = "fused", name: Optional[str] = None) -> MemoryReport:
    """Stock against fused saved-for-backward bytes of one training forward on `example_input`,
    per fused block or unit (the modules fusedres.fuse swapped in) and in total.

    model: a stock model (fused here, on a deep copy) or a fused one (its stock form from
    fusedres.unfuse). memory_efficient: fuse with it (None: as the fused model has it; False for a
    stock model). train_path: on the CPU, "fused" (default) shows the fused units wherever they
    can run, "measure" what the CPU's measured choice runs (stock where it measured faster: the
    saving only where the fused units run), None as FUSEDRES_CPU_TRAIN_PATH says. Both models run
    in training mode on deep copies (the caller's running statistics stay as they are)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedres.memory_report: model must be an nn.Module, got {type(model).__name__}")
    if _is_fused(model):
        stock = unfuse(model)
        fused = copy.deepcopy(model)
        if memory_efficient is not None:
            set_memory_efficient(fused, memory_efficient)
    else:
        stock = copy.deepcopy(model)
        fused = fuse(model, memory_efficient=bool(memory_efficient))
    stock.train()
    fused.train()
    paths = _row_paths(fused)
    with forced_train_path(train_path):
        fused_bytes = saved_bytes_by_path(fused, example_input, list(paths))
    stock_modules = dict(stock.named_modules())
    stock_bytes = saved_bytes_by_path(stock, example_input, [p for p in paths if p in stock_modules])
    rows = [MemoryRow(p, kind, stock_bytes.get(p, 0), fused_bytes[p]) for p, kind in paths.items()]
    rows.append(MemoryRow(REST, "not fused", stock_bytes[REST], fused_bytes[REST]))
    efficient = any(getattr(m, "fusedres_memory_efficient", False) for m in fused.modules())
    return MemoryReport(name or type(model).__name__, rows, efficient, train_path)
