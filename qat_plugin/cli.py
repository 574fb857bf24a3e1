"""The `qat-plugin` command: `compare`, `inspect`, `recipes` and `demo`.

Examples:

    qat-plugin demo --output qat-demo --recipe int8-pruned-50
    qat-plugin recipes
    qat-plugin recipes show int8-mcu
    qat-plugin compare float.keras --data eval.npz --calibration train.npz \\
        --qat qat.keras --output report
    qat-plugin inspect model.tflite
"""

import argparse
import json
import os
import sys

DATA_HELP = (
    "a .npz file with arrays 'x' and 'y' (inputs and labels; for several "
    "inputs 'x_<input name>' per input), or 'fashion_mnist' for the "
    "built-in dataset's test split"
)


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


def _parser():
    parser = argparse.ArgumentParser(
        prog="qat-plugin",
        description="Quantization-aware training for Keras 3: compare QAT with "
        "post-training quantization, inspect .tflite models, run the demo.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    compare = commands.add_parser(
        "compare",
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
        "--modes",
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

    inspect = commands.add_parser("inspect", help="print a .tflite model's ops and types")
    inspect.add_argument("model", help="a .tflite file")
    inspect.add_argument("--json", action="store_true",
                         help="print op counts and float ops as JSON")
    inspect.add_argument("--target", action="append", choices=("cpu", "gpu", "mcu"),
                         help="check a deployment target (repeatable)")
    inspect.add_argument("--arena", type=positive_int, metavar="BYTES",
                         help="the tensor arena of the microcontroller: checks target mcu "
                              "against it (exit status 1 when the model needs more)")

    recipes = commands.add_parser(
        "recipes", help="list the built-in QAT recipes, or show one with its documentation"
    )
    recipes.add_argument("action", nargs="?", choices=("list", "show"), default="list")
    recipes.add_argument("name", nargs="?", help="the recipe to show")

    demo = commands.add_parser(
        "demo",
        help="train a small MobileNet-style model on Fashion-MNIST, run QAT and "
        "compare it with PTQ",
    )
    demo.add_argument("--output", default="qat-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--recipe", default="int8",
                      help="QAT recipe: a built-in name or a TOML file (default: %(default)s)")
    demo.add_argument("--epochs", type=int, default=2, help="float epochs (default: %(default)s)")
    demo.add_argument("--qat-epochs", type=int, default=1, help="QAT epochs (default: %(default)s)")
    demo.add_argument("--train-samples", type=positive_int,
                      help="use only N training images (quick try; too few steps "
                      "leave BatchNorm unsettled)")
    demo.add_argument("--eval-samples", type=positive_int, help="evaluate on N test images")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def _load_npz(path, argument):
    import numpy as np

    if not os.path.exists(path):
        raise FileNotFoundError(f"{argument}: no file at {path}.")
    if path.endswith(".npy"):
        return {"x": np.load(path, allow_pickle=False)}
    with np.load(path, allow_pickle=False) as arrays:
        return dict(arrays)


def load_keras_model(path, argument):
    """Loads the .keras model at `path`, given as `argument`, or says why not.

    A missing file is a `FileNotFoundError`; a file that is not a .keras
    (zip) archive, or an archive without a model in it, is a
    `ModelFileError` naming `argument` and the file, not Keras'
    "File not found".

    Examples:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "broken.keras")
        >>> with open(path, "wb") as f:
        ...     _ = f.write(b"not a zip archive")
        >>> load_keras_model(path, "--qat")
        Traceback (most recent call last):
        ...
        qat_plugin.errors.ModelFileError: --qat '...broken.keras' is not a valid .keras file: ...
    """
    import zipfile

    import keras

    from qat_plugin.errors import ModelFileError

    if not os.path.exists(path):
        raise FileNotFoundError(f"{argument}: no file at {path}.")
    if os.path.isdir(path):
        raise ModelFileError(
            f"{argument} {path!r} is a folder: give a .keras file written by "
            "model.save('model.keras')."
        )
    again = "save the model again with model.save('model.keras')"
    if path.endswith(".keras"):
        if not zipfile.is_zipfile(path):
            raise ModelFileError(
                f"{argument} {path!r} is not a valid .keras file: a .keras model "
                f"is a zip archive, and these {os.path.getsize(path)} bytes are "
                f"not one (truncated, or another format); {again}."
            )
        with zipfile.ZipFile(path) as archive:
            if "config.json" not in archive.namelist():
                raise ModelFileError(
                    f"{argument} {path!r} is a zip archive but not a .keras "
                    f"model: it has no config.json; {again}."
                )
    try:
        return keras.saving.load_model(path)
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as error:
        raise ModelFileError(
            f"{argument} {path!r} cannot be loaded as a Keras model "
            f"({type(error).__name__}: {error}); give a .keras file, or {again}."
        ) from error


def _inputs_from(arrays, model, path, prefix="x"):
    from qat_plugin.data.batches import input_specs

    specs = input_specs(model)
    if len(specs) == 1 and prefix in arrays:
        return arrays[prefix]
    keys = [f"{prefix}_{spec.name}" for spec in specs]
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ValueError(
            f"{path} has arrays {sorted(arrays)}; expected '{prefix}'"
            + (f" or {keys}" if len(specs) > 1 else "")
            + f" for model '{model.name}'."
        )
    return {spec.name: arrays[key] for spec, key in zip(specs, keys)}


def _compare_data(args, model):
    if args.data == "fashion_mnist":
        from qat_plugin.data.datasets import fashion_mnist

        data = fashion_mnist()
        print(f"data: {data.source}", file=sys.stderr)
        eval_data = (data.x_test, data.y_test)
        calibration = data.x_train[:500]
    else:
        arrays = _load_npz(args.data, "--data")
        if "y" not in arrays:
            raise ValueError(f"--data {args.data} has no 'y' array (the labels).")
        eval_data = (_inputs_from(arrays, model, args.data), arrays["y"])
        calibration = (
            _inputs_from(arrays, model, args.data, "x_calibration")
            if any(k.startswith("x_calibration") for k in arrays)
            else None
        )
    if args.calibration:
        calibration = _inputs_from(_load_npz(args.calibration, "--calibration"), model,
                                   args.calibration)
    if args.max_samples:
        x, y = eval_data
        x = {k: v[: args.max_samples] for k, v in x.items()} if isinstance(x, dict) else x[: args.max_samples]
        eval_data = (x, y[: args.max_samples])
    return eval_data, calibration


def _compare(args):
    import qat_plugin
    from qat_plugin.analysis.layerwise import layerwise_error

    model = load_keras_model(args.model, "model")
    qat_model = load_keras_model(args.qat, "--qat") if args.qat else None
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    eval_data, calibration = _compare_data(args, model)
    report = qat_plugin.analysis.compare(
        model,
        qat_model,
        eval_data=eval_data,
        representative_data=calibration,
        modes=modes,
        num_threads=args.threads,
        latency_runs=args.latency_runs,
    )
    print(report.to_json() if args.json else report.to_markdown())
    if args.output:
        paths = report.save(args.output)
        print(f"wrote {', '.join(sorted(paths.values()))}", file=sys.stderr)
    if args.layerwise:
        x = eval_data[0]
        for row in report.rows:
            if not (row.fully_int8 or row.mode == "int16x8"):
                continue
            references = [(model, "the float model")]
            if row.name.startswith("qat"):
                references.append((qat_model, "the QAT Keras model (export fidelity)"))
            for reference, label in references:
                print()
                print(layerwise_error(
                    reference, row.tflite, x,
                    title=f"{row.name}: layer-wise error against {label}",
                ))
    return 0


def _inspect(args):
    from qat_plugin.tflite.inspection import inspect_tflite

    targets = tuple(args.target or ()) + (("mcu",) if args.arena else ())
    report = inspect_tflite(args.model, targets=tuple(dict.fromkeys(targets)),
                            arena_limit=args.arena)
    if args.json:
        print(json.dumps({
            "size_bytes": report.size_bytes,
            "fully_int8": report.is_fully_int8,
            "op_counts": dict(report.op_counts),
            "float_ops": [f"{op.name}#{op.index}" for op in report.float_ops],
            "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
                       for t in report.inputs],
            "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
                        for t in report.outputs],
            "targets": {c.target: {"compatible": c.compatible,
                                   "offending": [list(o) for o in c.offending],
                                   "notes": list(c.notes),
                                   "arena_bytes": c.arena_bytes}
                        for c in report.targets},
        }, indent=2))
    else:
        print(report.summary())
    return 1 if args.arena and not report.target("mcu").compatible else 0


def _recipes(args):
    from qat_plugin import recipes

    if args.action == "show":
        if not args.name:
            raise ValueError(
                f"recipes show needs a NAME: one of {', '.join(recipes.names())}."
            )
        path = recipes.path_of(args.name)
        recipes.get(args.name)  # Validated before it is shown.
        with open(path, encoding="utf-8") as f:
            print(f.read(), end="")
        return 0
    if args.name:
        raise ValueError("recipes takes a NAME only with show: qat-plugin recipes show NAME.")
    rows = [recipes.get(name) for name in recipes.names()]
    width = max(len(r.name) for r in rows)
    print(f"{'recipe':{width}s}  {'target':6s}  description")
    for r in rows:
        print(f"{r.name:{width}s}  {r.export.target:6s}  {r.description}")
    print("\n`qat-plugin recipes show NAME` prints a recipe with its documentation.")
    return 0


def _demo(args):
    from qat_plugin.demo import run_demo

    run_demo(
        args.output,
        args.recipe,
        epochs=args.epochs,
        qat_epochs=args.qat_epochs,
        train_samples=args.train_samples,
        eval_samples=args.eval_samples,
        seed=args.seed,
    )
    return 0


def _quiet_converter_logs():
    """Keeps the converter's Python-side deprecation chatter out of the output."""
    import warnings

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"tensorflow\..*")


def main(argv=None):
    """Runs the `qat-plugin` command; returns the exit status.

    Examples:
        >>> main(["inspect", "/nonexistent.tflite"])  # the error goes to stderr
        1
    """
    from qat_plugin.errors import ExportError, QATError

    args = _parser().parse_args(argv)
    _quiet_converter_logs()
    handlers = {"compare": _compare, "inspect": _inspect, "recipes": _recipes,
                "demo": _demo}
    try:
        return handlers[args.command](args)
    except (QATError, ValueError, ExportError, OSError) as e:
        print(f"qat-plugin: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
