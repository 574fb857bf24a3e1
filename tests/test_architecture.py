"""The layout rules import-linter cannot check: callbacks/, recipes/, the entry point, private names, size.

import-linter (run in CI, contracts in pyproject.toml) checks the stages
inside the qat_plugin/ folder. `callbacks/` and `recipes/` are the packages
`qat_plugin.callbacks` and `qat_plugin.recipes` but live beside it, where
import-linter does not look: their imports are read here with `ast`. So
are those of `qat_plugin_cli/`, the `qat-plugin` entry point, a top-level
package above everything: at module level it imports only the standard
library (and itself), so that `--help` and `recipes` never load TensorFlow;
inside a function it may import `qat_plugin.cli`, the stage at the top.
"""

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted(
    [*(ROOT / "qat_plugin").rglob("*.py"), *(ROOT / "callbacks").rglob("*.py"),
     *(ROOT / "recipes").rglob("*.py"), *(ROOT / "qat_plugin_cli").rglob("*.py")]
)
# What sits below callbacks/ and recipes/ (pyproject's import-linter layers).
ENGINE = {
    "analysis", "tflite", "pruning", "quantize", "layers", "registry",
    "quantizers", "sparsity", "linear_ops", "config", "data", "errors",
    "files", "distribution",
}
ALLOWED = {"callbacks": ENGINE | {"callbacks"},
           "recipes": ENGINE | {"callbacks", "recipes"}}
MAX_LINES = 400


def _module_name(path):
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[0] in ("callbacks", "recipes"):
        parts.insert(0, "qat_plugin")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path):
    """`(line, module, names)` for every `import` / `from ... import` of qat_plugin."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "qat_plugin":
                yield node.lineno, node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "qat_plugin":
                    yield node.lineno, alias.name, []


def _stage(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_callbacks_and_recipes_import_only_the_stages_below_them(package):
    wrong = []
    for path in (ROOT / package).rglob("*.py"):
        for line, module, names in _imports(path):
            stages = {_stage(module)} if _stage(module) else set(names)
            for stage in stages - ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({stage})")
    assert not wrong, "\n".join(wrong)


def _imported_modules(path, top_level_only):
    """`(line, module)` of each import of `path` (only the module-level ones)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def test_the_entry_point_imports_only_the_standard_library_at_module_level():
    wrong = []
    for path in (ROOT / "qat_plugin_cli").rglob("*.py"):
        for line, module in _imported_modules(path, top_level_only=True):
            top = module.split(".")[0]
            if top not in sys.stdlib_module_names and top != "qat_plugin_cli":
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
        for line, module in _imported_modules(path, top_level_only=False):
            if module.split(".")[0] == "qat_plugin" and module != "qat_plugin.cli":
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module} (not the cli stage)")
    assert not wrong, "\n".join(wrong)


def test_only_the_cli_stage_calls_the_entry_point_and_not_at_import():
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in SOURCES if path.parts[len(ROOT.parts)] != "qat_plugin_cli"
        for line, module in _imported_modules(
            path, top_level_only=path == ROOT / "qat_plugin" / "cli.py")
        if module.split(".")[0] == "qat_plugin_cli"
    ]
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_a_private_name_of_another():
    private = [
        f"{path.relative_to(ROOT)}:{line} imports {module}.{name}"
        for path in SOURCES
        for line, module, names in _imports(path)
        for name in names
        if name.startswith("_") and module != _module_name(path)
    ]
    assert not private, "\n".join(private)


def test_no_module_is_over_the_size_limit():
    long = [
        f"{path.relative_to(ROOT)}: {count} lines"
        for path in SOURCES
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, "\n".join(long)


def test_the_checker_sees_a_violation():
    # The rules above would pass vacuously if the parser found no imports.
    found = list(_imports(ROOT / "recipes" / "__init__.py"))
    assert any(module.startswith("qat_plugin.quantize") for _, module, _ in found)
    assert _stage("qat_plugin.demo") == "demo" and "demo" not in ALLOWED["recipes"]


def test_layer_classes_moved_to_layers_still_import_from_the_top_with_a_warning():
    import qat_plugin
    from qat_plugin import layers

    with pytest.warns(DeprecationWarning, match="qat_plugin.layers.QuantizedLinear"):
        moved = qat_plugin.QuantizedLinear
    assert moved is layers.QuantizedLinear
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        qat_plugin.NotAThing
