"""The `qat-plugin` commands that need the engine: `compare`, `inspect`, `demo`.

The entry point is the light `qat_plugin_cli` package: it parses and checks
the arguments and answers `--help` and `recipes` without importing
TensorFlow, then calls `run(args)` here. `main(argv)` is that same entry
point, kept for scripts installed before it moved.
"""

import json
import os
import sys

from qat_plugin.quiet import quiet_python_logs, status


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

    from qat_plugin.errors import ExportError
    from qat_plugin.tflite.input_shapes import export_input_specs
    from qat_plugin_cli.arguments import input_shapes

    model = load_keras_model(args.model, "model")
    qat_model = load_keras_model(args.qat, "--qat") if args.qat else None
    input_shape = input_shapes(args.input_shape)
    try:
        export_input_specs(model, input_shape)
    except ExportError as error:
        raise ExportError(
            f"{error} On the command line: --input-shape 16,16,3 for one input, "
            "--input-shape NAME=16,16,3 for each of several."
        ) from None
    eval_data, calibration = _compare_data(args, model)
    status(f"qat-plugin: exporting {', '.join(args.modes)}"
           f"{' and the QAT model' if qat_model is not None else ''} and measuring "
           "them in the LiteRT interpreter ...")
    report = qat_plugin.analysis.compare(
        model,
        qat_model,
        eval_data=eval_data,
        representative_data=calibration,
        modes=args.modes,
        num_threads=args.threads,
        latency_runs=args.latency_runs,
        input_shape=input_shape,
    )
    print(report.to_json() if args.json else report.to_markdown())
    if args.output:
        paths = report.save(args.output)
        print(f"wrote {', '.join(sorted(paths.values()))}", file=sys.stderr)
    if args.layerwise:
        status("qat-plugin: layer-wise error of the int8 candidates ...")
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


def run(args):
    """Runs a parsed and checked `compare`, `inspect` or `demo`; the exit status.

    `args` comes from `qat_plugin_cli.arguments` (`build_parser`, `check`).

    Examples:
        >>> from qat_plugin_cli.arguments import build_parser
        >>> run(build_parser().parse_args(["inspect", "/nonexistent.tflite"]))
        1
    """
    from qat_plugin.errors import ExportError, QATError

    quiet_python_logs()
    handlers = {"compare": _compare, "inspect": _inspect, "demo": _demo}
    try:
        return handlers[args.command](args)
    except (QATError, ValueError, ExportError, OSError) as e:
        print(f"qat-plugin: error: {e}", file=sys.stderr)
        return 1


def main(argv=None):
    """The `qat-plugin` command (`qat_plugin_cli.main`); returns the exit status.

    Examples:
        >>> main(["inspect", "/nonexistent.tflite"])  # the error goes to stderr
        1
    """
    from qat_plugin_cli import main as entry_point

    return entry_point(argv)


if __name__ == "__main__":
    sys.exit(main())
