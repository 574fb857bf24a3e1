"""The `qat-plugin` arguments: parsed and checked before the engine loads.

Everything here uses only the standard library, so a wrong value (a
`--modes` name, a count, a missing file, an unknown recipe) is refused in
well under a second, before TensorFlow is imported or data is loaded. The
allowed modes are read from `qat_plugin/config/constants.py` without
running it (`engine_files.module_constants`).
"""

import argparse
import os

from qat_plugin_cli import recipe_list
from qat_plugin_cli.engine_files import module_constants

DATA_HELP = (
    "a .npz file with arrays 'x' and 'y' (inputs and labels; for several "
    "inputs 'x_<input name>' per input), or 'fashion_mnist' for the "
    "built-in dataset's test split"
)
BUILTIN_DATA = "fashion_mnist"


class UsageError(ValueError):
    """An argument that names a missing file or an unknown recipe."""


def positive_int(text):
    """Parses a command-line count that must be a whole number of 1 or more.

    argparse names the flag in its message: `argument --latency-runs: ...`.

    Examples:
        >>> positive_int("3")
        3
        >>> positive_int("0")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: must be 1 or more, got 0.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of 1 or more, got {text!r}."
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}.")
    return value


def mode_list(text):
    """Parses `--modes`: comma-separated export modes, each a known one.

    Examples:
        >>> mode_list("float, int8")
        ('float', 'int8')
        >>> mode_list("int8,int4")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: unknown mode 'int4'; choose from float, dynamic, float16, int8, int16x8.
    """
    known = module_constants("qat_plugin.config.constants", ["MODES"])["MODES"]
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    if not modes:
        raise argparse.ArgumentTypeError(f"no mode given; choose from {', '.join(known)}.")
    for mode in modes:
        if mode not in known:
            raise argparse.ArgumentTypeError(
                f"unknown mode {mode!r}; choose from {', '.join(known)}."
            )
    return tuple(dict.fromkeys(modes))


def input_shape_item(text):
    """Parses one `--input-shape`: `16,16,3`, or `NAME=12` for one of several inputs.

    Returns `(name, shape)`, the name `None` when none is given.

    Examples:
        >>> input_shape_item("16, 16, 3"), input_shape_item("tokens=12")
        ((None, (16, 16, 3)), ('tokens', (12,)))
        >>> input_shape_item("tokens=twelve")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: expected sizes of 1 or more separated by commas ...
    """
    name, _, sizes = text.rpartition("=")
    try:
        shape = tuple(int(s) for s in sizes.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            "expected sizes of 1 or more separated by commas (one sample's "
            f"shape, without the batch axis: 16,16,3), optionally NAME=, got {text!r}."
        )
    return (name.strip() or None), shape


def input_shapes(items, argument="--input-shape"):
    """Turns parsed `--input-shape` items into `export_tflite`'s `input_shape`.

    Examples:
        >>> input_shapes([(None, (12,))]), input_shapes([("a", (4,)), ("b", (2, 3))])
        ((12,), {'a': (4,), 'b': (2, 3)})
        >>> input_shapes(None) is None
        True
    """
    if not items:
        return None
    if len(items) == 1 and items[0][0] is None:
        return items[0][1]
    if any(name is None for name, _ in items):
        raise UsageError(
            f"{argument}: with several inputs name each one: {argument} "
            f"NAME=16,16,3 {argument} OTHER=12."
        )
    return dict(items)


def build_parser():
    """The `qat-plugin` argument parser (every subcommand, `--verbose`).

    Examples:
        >>> build_parser().parse_args(["recipes", "show", "int8"]).name
        'int8'
        >>> build_parser().parse_args(["inspect", "m.tflite", "--verbose"]).verbose
        True
    """
    parser = argparse.ArgumentParser(
        prog="qat-plugin",
        description="Quantization-aware training for Keras 3: compare QAT with "
        "post-training quantization, inspect .tflite models, run the demo.",
    )
    verbose_help = ("show TensorFlow's and the converter's logs (also "
                    "QAT_PLUGIN_VERBOSE=1); quiet by default")
    parser.add_argument("--verbose", action="store_true", help=verbose_help)
    # The flag also after the command; SUPPRESS keeps the one before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help=verbose_help)
    commands = parser.add_subparsers(dest="command", required=True)

    compare = commands.add_parser(
        "compare", parents=[common],
        help="export PTQ baselines (and a QAT model) and measure them in LiteRT",
    )
    compare.add_argument("model", help="the float model (.keras)")
    compare.add_argument("--data", required=True, help=f"evaluation data: {DATA_HELP}")
    compare.add_argument(
        "--calibration",
        help="calibration inputs for int8/int16x8 (a .npz with 'x' or a .npy); "
        "default: 'x_calibration' in --data, or the training split of "
        "fashion_mnist",
    )
    compare.add_argument("--qat", help="a trained QAT model (.keras) to compare too")
    compare.add_argument(
        "--modes", type=mode_list,
        default="float,dynamic,float16,int8",
        help="comma-separated PTQ modes: float, dynamic, float16, int8, int16x8 "
        "(default: %(default)s)",
    )
    compare.add_argument("--output", help="folder for comparison.md/.json/.png and the .tflite files")
    compare.add_argument("--layerwise", action="store_true",
                         help="also print the layer-wise error of each int8 candidate")
    compare.add_argument("--threads", type=positive_int, default=1,
                         help="interpreter threads (default: 1)")
    compare.add_argument("--latency-runs", type=positive_int, default=100,
                         help="timed single-sample invokes, 1 or more (default: 100)")
    compare.add_argument("--max-samples", type=positive_int,
                         help="evaluate only the first N samples (N >= 1; default: all)")
    compare.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    compare.add_argument(
        "--input-shape", type=input_shape_item, action="append", metavar="[NAME=]SIZES",
        help="fixed shape of an input of undefined size, one sample without the "
        "batch axis: 16,16,3 (images of any size) or tokens=128 (one per input)",
    )

    inspect = commands.add_parser("inspect", parents=[common],
                                  help="print a .tflite model's ops and types")
    inspect.add_argument("model", help="a .tflite file")
    inspect.add_argument("--json", action="store_true",
                         help="print op counts and float ops as JSON")
    inspect.add_argument("--target", action="append", choices=("cpu", "gpu", "mcu"),
                         help="check a deployment target (repeatable)")
    inspect.add_argument("--arena", type=positive_int, metavar="BYTES",
                         help="the tensor arena of the microcontroller: checks target mcu "
                              "against it (exit status 1 when the model needs more)")

    recipes = commands.add_parser(
        "recipes", parents=[common],
        help="list the built-in QAT recipes, or show one with its documentation",
    )
    recipes.add_argument("action", nargs="?", choices=("list", "show"), default="list")
    recipes.add_argument("name", nargs="?", help="the recipe to show")

    demo = commands.add_parser(
        "demo", parents=[common],
        help="train a small MobileNet-style model on Fashion-MNIST, run QAT and "
        "compare it with PTQ",
    )
    demo.add_argument("--output", default="qat-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--recipe", default="int8",
                      help="QAT recipe: a built-in name or a TOML file (default: %(default)s)")
    demo.add_argument("--epochs", type=positive_int, default=2,
                      help="float epochs (default: %(default)s)")
    demo.add_argument("--qat-epochs", type=positive_int, default=1,
                      help="QAT epochs (default: %(default)s)")
    demo.add_argument("--train-samples", type=positive_int,
                      help="use only N training images (quick try; too few steps "
                      "leave BatchNorm unsettled)")
    demo.add_argument("--eval-samples", type=positive_int, help="evaluate on N test images")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def _existing(path, argument):
    if path is not None and not os.path.exists(path):
        raise UsageError(f"{argument}: no file at {path}.")


def check(args):
    """Checks what argparse cannot: files exist, recipes are known.

    Raises `UsageError` (or `recipe_list.RecipeNameError`) naming the
    argument, before any data or model is loaded.

    Examples:
        >>> args = build_parser().parse_args(["demo", "--recipe", "int9"])
        >>> check(args)
        Traceback (most recent call last):
        ...
        qat_plugin_cli.recipe_list.RecipeNameError: Unknown recipe 'int9'. ...
        >>> check(build_parser().parse_args(["inspect", "missing.tflite"]))
        Traceback (most recent call last):
        ...
        qat_plugin_cli.arguments.UsageError: No .tflite file at missing.tflite.
    """
    if args.command == "compare":
        _existing(args.model, "model")
        _existing(args.qat, "--qat")
        if args.data != BUILTIN_DATA:
            _existing(args.data, "--data")
        _existing(args.calibration, "--calibration")
        input_shapes(args.input_shape)
    elif args.command == "inspect":
        if not os.path.exists(args.model):
            raise UsageError(f"No .tflite file at {args.model}.")
    elif args.command == "demo":
        recipe = args.recipe
        if recipe.endswith(".toml") or os.sep in recipe:
            _existing(recipe, "--recipe")
        else:
            recipe_list.path_of(recipe)
    elif args.command == "recipes":
        if args.action == "show" and not args.name:
            raise UsageError(
                f"recipes show needs a NAME: one of {', '.join(recipe_list.names())}."
            )
        if args.action == "list" and args.name:
            raise UsageError(
                "recipes takes a NAME only with show: qat-plugin recipes show NAME."
            )
        if args.name:
            recipe_list.path_of(args.name)
