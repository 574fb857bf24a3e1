"""Every docstring example in the package runs and prints what it shows.

The modules are imported by their package names (`qat_plugin.callbacks.*`
lives in `callbacks/`), so the examples run against the installed package
exactly as a user's would; `qat_plugin_cli`, the light entry point of the
`qat-plugin` command, is checked with them.
"""

import doctest
import importlib
import pkgutil

import pytest

import qat_plugin
import qat_plugin_cli


def _module_names():
    names = []
    for package in (qat_plugin, qat_plugin.callbacks, qat_plugin.recipes, qat_plugin_cli):
        names.append(package.__name__)
        names += [
            info.name
            for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
        ]
    return sorted(set(names) - {"qat_plugin.__main__", "qat_plugin_cli.__main__"})


MODULES = _module_names()


def test_every_stage_is_collected():
    stages = {name.split(".")[1] for name in MODULES if "." in name}
    assert {"analysis", "callbacks", "config", "layers", "quantize", "recipes",
            "tflite", "pruning", "registry"} <= stages


@pytest.mark.slow
@pytest.mark.tf_only
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    failures = []
    for test in finder.find(module, name, globs=dict(vars(module))):
        runner.run(test, out=failures.append)
    assert not failures, "".join(failures)
