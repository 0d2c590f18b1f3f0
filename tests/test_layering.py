"""Imports flow one way, bottom-up, and a test holds it.

  0 common, _versions               layout, dtypes, allocation, warn-once, tracing, the Triton launch
  1 kernels, _extension (_C)         Triton kernels (torch, triton and layer 0 only); the C++ / CUDA ones
  2 ops                              one registry; the checked public functions; ops.direct
  3 autograd                         torch.autograd.Functions
  4 batchnorm, block_plumbing,       the modules, split by job
    modules, dense_modules
  5 fuse, memory                     fuse(model); memory_report(model, x)
  6 fusedres/__init__, __main__
Each file imports only layers below its own, or public names of its own layer (no sideways
import of a `_private` name or module). The reference models (fusedres/models) are what the fused
modules are checked against where torchvision is absent, so they import nothing of fusedres: an
oracle that shares code with what it checks cannot catch that code's bugs (torchvision's DenseNet
crashed `fuse` while every test against the package's own copy passed). The fused modules may
build on them (subclass and override forward), never the reverse."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fusedres"
MODEL_FILES = sorted((PACKAGE / "models").glob("*.py"))
LAYER_OF = {"common": 0, "_versions": 0, "models": 0, "kernels": 1, "_extension": 1, "_C": 1, "ops": 2, "autograd": 3,
            "batchnorm": 4, "block_plumbing": 4, "modules": 4, "dense_modules": 4, "fuse": 5, "memory": 5, "__init__": 6,
            "__main__": 6}
THIRD_PARTY_OF_KERNELS = {"torch", "triton"}


def _imports(path: pathlib.Path):
    """(module imported, relative level) of every import statement in the file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    if dotted == "fusedres._C":  # the compiled extension
        return True
    rel = pathlib.Path(*dotted.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").exists() or (PACKAGE.parent / rel / "__init__.py").exists()


def _imported(path: pathlib.Path, source: str):
    """(fusedres module imported, names taken from it) per import of fusedres in `source`, and the
    third-party top-level packages imported."""
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found, third_party = [], set()
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fusedres":
                    found.append((alias.name, []))
                else:
                    third_party.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "fusedres":
                third_party.add(base.split(".")[0])
                continue
            names = [a.name for a in node.names]
            submodules = [n for n in names if _is_module(f"{base}.{n}")]
            found += [(f"{base}.{n}", []) for n in submodules]
            rest = [n for n in names if n not in submodules]
            if rest or not names:
                found.append((base, rest))
    return found, third_party


def _layer(dotted: str) -> int:
    parts = dotted.split(".")
    return LAYER_OF["__init__"] if len(parts) == 1 else LAYER_OF[parts[1]]


def violations(path: pathlib.Path, source: str = None):
    source = path.read_text() if source is None else source
    me = _module_name(path)
    mine = LAYER_OF["__main__" if path.name == "__main__.py" else ("__init__" if me == "fusedres" else me.split(".")[1])]
    found, third_party = _imported(path, source)
    bad = []
    for target, names in found:
        layer = _layer(target)
        if layer > mine:
            bad.append(f"upward: {target} (layer {layer}) from layer {mine}")
        elif layer == mine and target != me and (me, target) != ("fusedres._extension", "fusedres._C"):
            private = [n for n in names if n.startswith("_")]
            if private or target.split(".")[-1].startswith("_") and layer > 0:
                bad.append(f"sideways private: {target} {private}")
    if mine == LAYER_OF["kernels"]:
        bad += [f"kernels import {t}" for t in third_party - THIRD_PARTY_OF_KERNELS - _stdlib()]
    return bad


def _stdlib():
    import sys

    return set(sys.stdlib_module_names)


PACKAGE_FILES = sorted(p for p in PACKAGE.rglob("*.py") if "models" not in p.relative_to(PACKAGE).parts)


@pytest.mark.parametrize("path", PACKAGE_FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_bottom_up(path):
    bad = violations(path)
    assert not bad, f"{path.relative_to(PACKAGE.parent)}: {bad}"


def test_every_file_has_a_layer():
    for path in PACKAGE_FILES:
        top = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        assert top in LAYER_OF, f"{path}: add its layer to LAYER_OF"


@pytest.mark.parametrize("source,expected", [
    ("from ..autograd import units", "upward"),  # a kernel importing autograd
    ("from .bn_act_triton import _elementwise_grid", "sideways private"),
    ("import numpy", "kernels import numpy"),
    ("from ..common import launch\nfrom .tiles import tl_acc\nimport triton, os", None),
])
def test_the_layering_check_fails_where_it_should(source, expected):
    """The checker itself, on sources placed in the kernels layer (a test that cannot fail is a defect)."""
    bad = violations(PACKAGE / "kernels" / "conv_triton.py", source)
    if expected is None:
        assert not bad, bad
    else:
        assert any(expected in b for b in bad), bad


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.name)
def test_reference_models_import_nothing_of_fusedres(path):
    bad = [f"{'.' * level}{name}" for name, level in _imports(path)
           if (level > 0 and not (level == 1 and path.name == "__init__.py")) or name.split(".")[0] == "fusedres"]
    assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}: the references must stand apart"


def test_the_check_sees_imports():
    """The checker itself: it finds relative and absolute imports (a test that cannot fail is a defect)."""
    sample = PACKAGE / "dense_modules.py"
    found = {(name, level) for name, level in _imports(sample)}
    assert ("models.densenet", 1) in found and ("torch.nn", 0) in found, found
