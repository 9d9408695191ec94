"""The package's layers import downwards only: data -> models -> fast -> backprop -> engine -> train -> tools -> cli.

Every `import` and `from ... import` in cnnlab/, at module level or inside a
function, is read from the source; one that reaches a higher layer fails the
test with the file, the line and the two layers named.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cnnlab"

# Lowest first. The base modules are helpers every layer may use (the error type, the typed
# configuration, atomic writes, the numba decorator); they import nothing above them either.
LAYERS = [
    {"cnnlab", "cnnlab.errors", "cnnlab.config", "cnnlab.atomicfile", "cnnlab.compiled"},
    {"cnnlab.data"},
    {"cnnlab.models"},
    {"cnnlab.fast"},
    {"cnnlab.backprop"},
    {"cnnlab.engine"},
    {"cnnlab.train"},
    {"cnnlab.tools"},
    {"cnnlab.cli", "cnnlab.__main__"},
]


def layer_of(module: str) -> int:
    """The index in LAYERS of the most specific entry that `module` is or lies inside."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        for rank, layer in enumerate(LAYERS):
            if prefix in layer:
                return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def module_name(path: Path, root: Path = PACKAGE) -> str:
    relative = path.relative_to(root.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every cnnlab module that `path` imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from cnnlab import x` may name a submodule x; judge by the submodule then.
            names = [f"{node.module}.{alias.name}" for alias in node.names] if node.module == "cnnlab" else [node.module]
            found += [(node.lineno, name) for name in names]
    return [(line, name) for line, name in found if name == "cnnlab" or name.startswith("cnnlab.")]


def upward_imports(root: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        for line, imported in imports(path):
            if imported.startswith("cnnlab.") and imported.rsplit(".", 1)[0] == "cnnlab" and not _exists(imported):
                imported = "cnnlab"  # a name defined in cnnlab/__init__.py
            if layer_of(imported) > layer_of(importer):
                problems.append(f"{path.relative_to(root.parent)}:{line}: {importer} (layer {layer_of(importer)}) "
                                f"imports {imported} (layer {layer_of(imported)})")  # fmt: skip
    return problems


def _exists(module: str) -> bool:
    relative = Path(*module.split("."))
    return (PACKAGE.parent / relative).with_suffix(".py").exists() or (PACKAGE.parent / relative).is_dir()


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports() == []


def test_every_module_belongs_to_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))


def test_an_upward_import_is_caught_with_its_file_and_line(tmp_path):
    package = tmp_path / "cnnlab"
    (package / "fast").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "fast" / "__init__.py").write_text("")
    (package / "fast" / "plan.py").write_text("import torch\n\ndef f():\n    from cnnlab.train.loop import fit\n")
    (problem,) = upward_imports(package)
    assert problem.startswith("cnnlab/fast/plan.py:4: cnnlab.fast.plan (layer 3) imports cnnlab.train.loop (layer 6)")


@pytest.mark.parametrize("module, rank", [("cnnlab.errors", 0), ("cnnlab.data.idx", 1), ("cnnlab.cli", 8)])
def test_layers_are_found_by_the_longest_matching_name(module, rank):
    assert layer_of(module) == rank
