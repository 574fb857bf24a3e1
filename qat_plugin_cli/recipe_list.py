"""`qat-plugin recipes`: the built-in recipe files, listed and shown without the engine.

The built-in recipes are TOML files in the `qat_plugin.recipes` folder;
they are the one source of the data. Listing reads each file's
`description` and `[export] target` (following `extends`, as a recipe
does) with `tomllib`; showing prints the file. The engine's
`qat_plugin.recipes.get` validates the same files (tests/test_recipes.py
loads every one, tests/test_cli_startup.py checks that the listing agrees
with it).
"""

import difflib
import os
import tomllib

from qat_plugin_cli.engine_files import package_folder

SUFFIX = ".toml"
# `ExportSettings.target`'s default, for a recipe chain that sets none.
DEFAULT_TARGET = "any"


class RecipeNameError(ValueError):
    """An unknown built-in recipe name."""


def names():
    """The sorted names of the built-in recipes.

    Examples:
        >>> "int8" in names()
        True
    """
    folder = package_folder("qat_plugin.recipes")
    return sorted(f[: -len(SUFFIX)] for f in os.listdir(folder) if f.endswith(SUFFIX))


def path_of(name):
    """The file of built-in recipe `name`; an unknown name says which exist.

    Examples:
        >>> os.path.basename(path_of("int8-mcu"))
        'int8-mcu.toml'
        >>> path_of("int9")
        Traceback (most recent call last):
        ...
        qat_plugin_cli.recipe_list.RecipeNameError: Unknown recipe 'int9'. Built-in recipes: ... Did you mean 'int8'?
    """
    known = names()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise RecipeNameError(
            f"Unknown recipe '{name}'. Built-in recipes: {', '.join(known)}.{hint}"
        )
    return os.path.join(package_folder("qat_plugin.recipes"), name + SUFFIX)


def summary(name):
    """`(description, target)` of built-in recipe `name`, `extends` followed.

    Examples:
        >>> summary("int8-mcu")
        ('int8 checked for TFLite Micro: op set, int8 only, arena size', 'mcu')
    """
    description = target = None
    seen = []
    while name is not None and name not in seen:
        seen.append(name)
        with open(path_of(name), "rb") as f:
            data = tomllib.load(f)
        if description is None:
            description = data.get("description")
        if target is None:
            target = data.get("export", {}).get("target")
        name = data.get("extends")
    return description or "", target or DEFAULT_TARGET


def listing():
    """The table `qat-plugin recipes` prints: name, target, description.

    Examples:
        >>> print(listing().splitlines()[0])  # doctest: +NORMALIZE_WHITESPACE
        recipe  target  description
    """
    rows = [(name, *summary(name)) for name in names()]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'recipe':{width}s}  {'target':6s}  description"]
    lines += [f"{name:{width}s}  {target:6s}  {description}" for name, description, target in rows]
    lines += ["", "`qat-plugin recipes show NAME` prints a recipe with its documentation."]
    return "\n".join(lines)


def text_of(name):
    """The file of built-in recipe `name`, its comments included.

    Examples:
        >>> text_of("int8").startswith("# int8: the default recipe.")
        True
    """
    with open(path_of(name), encoding="utf-8") as f:
        return f.read()
