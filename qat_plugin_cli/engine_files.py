"""Files of the `qat_plugin` package, found without importing it.

`import qat_plugin` imports TensorFlow (its layers register their Keras
serializables), so the light entry point locates the engine's data files
the way the import system would, but stops before running any of its code:
`find_spec` asks the finders on `sys.meta_path` (the plain path finder, or
an editable install's) for each dotted name in turn, with the parent's
folder, and never imports a parent package.
"""

import ast
import importlib.util
import sys


def find_spec(fullname):
    """The module spec of `fullname` without importing any of its parents.

    Examples:
        >>> import os
        >>> spec = find_spec("qat_plugin.recipes")
        >>> os.path.isfile(os.path.join(spec.submodule_search_locations[0], "int8.toml"))
        True
    """
    if fullname in sys.modules:
        return importlib.util.find_spec(fullname)
    parent, _, _ = fullname.rpartition(".")
    path = find_spec(parent).submodule_search_locations if parent else None
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        spec = find(fullname, path) if find is not None else None
        if spec is not None:
            return spec
    raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)


def package_folder(fullname):
    """The folder of package `fullname` (for instance the recipe files').

    Examples:
        >>> import os
        >>> os.path.basename(package_folder("qat_plugin.config"))
        'config'
    """
    return list(find_spec(fullname).submodule_search_locations)[0]


def module_constants(fullname, names):
    """The literal values of top-level assignments `names` in module `fullname`.

    The module's source is parsed, not run, so a stdlib-only constants
    module (such as `qat_plugin.config.constants`) stays the one place that
    defines its values.

    Examples:
        >>> module_constants("qat_plugin.config.constants", ["TARGETS"])
        {'TARGETS': ('cpu', 'gpu', 'mcu')}
    """
    spec = find_spec(fullname)
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=spec.origin)
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id in names:
                found[target.id] = ast.literal_eval(node.value)
    missing = [name for name in names if name not in found]
    if missing:
        raise LookupError(f"{fullname} ({spec.origin}) assigns no literal {missing}.")
    return found
