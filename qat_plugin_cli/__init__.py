"""The `qat-plugin` command's entry point, light enough to answer at once.

`import qat_plugin` imports TensorFlow (the layers register their Keras
serializables, so that a saved QAT model loads after it), which takes tens
of seconds. This package sits outside it and imports only the standard
library: it parses and checks every argument (`arguments`), answers
`--help`, `recipes` and `recipes show NAME` from the recipe files
(`recipe_list`), and only then, for `compare`, `inspect` and `demo`,
imports `qat_plugin.cli`, which runs the command with the engine. Unless
`--verbose` (or `QAT_PLUGIN_VERBOSE=1`), TensorFlow's C++ logs are kept off
the console (`quiet_stderr`) and its Python logs by `qat_plugin.quiet`.

Examples:

    qat-plugin demo --output qat-demo --recipe int8-pruned-50
    qat-plugin recipes
    qat-plugin recipes show int8-mcu
    qat-plugin compare float.keras --data eval.npz --calibration train.npz \\
        --qat qat.keras --output report
    qat-plugin inspect model.tflite
"""

import os
import sys

from qat_plugin_cli import recipe_list
from qat_plugin_cli.arguments import build_parser, check
from qat_plugin_cli.quiet_stderr import VERBOSE_ENV, TensorFlowLogFilter, verbose_from_env


def _recipes(args):
    print(recipe_list.text_of(args.name) if args.action == "show" else recipe_list.listing(),
          end="" if args.action == "show" else "\n")
    return 0


def main(argv=None):
    """Runs the `qat-plugin` command; returns the exit status.

    Examples:
        >>> main(["inspect", "/nonexistent.tflite"])  # the error goes to stderr
        1
        >>> main(["recipes", "show", "int9"])
        1
    """
    args = build_parser().parse_args(argv)
    try:
        check(args)
        if args.command == "recipes":
            return _recipes(args)
    except (ValueError, OSError) as e:
        print(f"qat-plugin: error: {e}", file=sys.stderr)
        return 1
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # For qat_plugin.quiet and child processes.
    if verbose_from_env():
        return _run(args)
    # Read by TensorFlow once, when it loads (child processes inherit it).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with TensorFlowLogFilter():
        return _run(args)


def _run(args):
    print("qat-plugin: loading TensorFlow ...", file=sys.stderr, flush=True)
    from qat_plugin.cli import run

    return run(args)
