"""Imports flow one way. The reference models (fusedres/models) are what the fused modules are
checked against where torchvision is absent, so they import nothing of fusedres: an oracle that
shares code with what it checks cannot catch that code's bugs (torchvision's DenseNet crashed
`fuse` while every test against the package's own copy passed). The fused modules may build on
them (subclass and override forward), never the reverse."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fusedres"
MODEL_FILES = sorted((PACKAGE / "models").glob("*.py"))


def _imports(path: pathlib.Path):
    """(module imported, relative level) of every import statement in the file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level


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
