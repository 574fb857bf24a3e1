"""Speed at realistic sizes: QAT step, trace, export, calibration and memory.

For each keras.applications model (random weights, 10 classes, batch 32,
random data, TensorFlow CPU), in one process:

- step: the median `train_on_batch` time of the QAT model (`quantize_model`,
  default settings) over the float model's, timed interleaved in rounds
  (benchmarks/_tfmot_models.median_step_ms) so load changes hit both;
- trace: the first `train_on_batch` (tracing and the first step), QAT over
  float;
- export: `export_tflite` of the QAT model against the converter's int8
  post-training quantization of the float model, calibrated on the same
  32 samples (`calibration_steps=32`); both exports' op counts;
- calibrate: `qat_plugin.calibrate` of a fresh QAT model on 32 samples;
- quantize: `quantize_model`'s own time;

and, each in a process of its own so that the peak is its own: the peak
resident memory (VmHWM, Linux) of a `fit` of a few steps, QAT over float, and
how much the peak grew during that fit (at small sizes the peak is
TensorFlow's own, the same for both).
With --tfmot, the train-step ratio of tfmot's `quantize_model` of the same
architecture in tf_keras (benchmarks/_tfmot_speed_worker.py), where tfmot
builds it.

Writes benchmarks/results/speed.{md,json}. The figures are of a shared
2-core machine: the ratios are the ones to read.

Usage:
    python benchmarks/bench_speed.py [--models MobileNetV2:96 DenseNet121:64] [--steps 20] [--tfmot]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import keras
import numpy as np

import qat_plugin

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _results import write_results  # noqa: E402
from _tfmot_models import median_step_ms  # noqa: E402

DEFAULT_MODELS = ("MobileNetV2:96", "EfficientNetB0:64", "ResNet50:64", "DenseNet121:64")
BATCH = 32
CLASSES = 10


def _data(size, batch=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((batch, size, size, 3), dtype=np.float32)
    return x, rng.integers(0, CLASSES, batch).astype("int32")


def _float_model(name, size):
    keras.utils.set_random_seed(0)
    constructor = getattr(keras.applications, name)
    return constructor(input_shape=(size, size, 3), weights=None, classes=CLASSES,
                       classifier_activation=None)


def _compiled(model):
    model.compile(keras.optimizers.Adam(1e-4),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _seconds(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def _warm_up():
    """One step of a tiny model, so that TensorFlow's one-time start-up
    costs fall on neither model's first traced step."""
    tiny = keras.Sequential([keras.Input((4,)), keras.layers.Dense(CLASSES)])
    _compiled(tiny).train_on_batch(np.zeros((2, 4), "float32"), np.zeros(2, "int32"))


def measure(name, size, steps):
    """The in-process figures of one model."""
    x, y = _data(size)
    model = _float_model(name, size)
    quantize_s, qat = _seconds(qat_plugin.quantize_model, model)
    _compiled(model)
    _compiled(qat)
    float_trace_s, _ = _seconds(model.train_on_batch, x, y)
    qat_trace_s, _ = _seconds(qat.train_on_batch, x, y)
    step_ms = median_step_ms({"float": model.train_on_batch, "qat": qat.train_on_batch},
                             x, y, steps, warmup=2)
    qat_export_s, qat_data = _seconds(qat_plugin.export_tflite, qat)
    ptq_export_s, ptq_data = _seconds(qat_plugin.export_tflite, model, mode="int8",
                                      representative_data=x, calibration_steps=BATCH)
    fresh = qat_plugin.quantize_model(model)
    calibrate_s, _ = _seconds(qat_plugin.calibrate, fresh, x, batch_size=BATCH)
    qat_report, ptq_report = qat_plugin.inspect_tflite(qat_data), qat_plugin.inspect_tflite(ptq_data)
    return {
        "quantize_model_s": quantize_s,
        "float_step_ms": step_ms["float"], "qat_step_ms": step_ms["qat"],
        "step_ratio": step_ms["qat"] / step_ms["float"],
        "float_trace_s": float_trace_s, "qat_trace_s": qat_trace_s,
        "trace_ratio": qat_trace_s / float_trace_s,
        "qat_export_s": qat_export_s, "ptq_export_s": ptq_export_s,
        "export_ratio": qat_export_s / ptq_export_s,
        "calibrate_32_s": calibrate_s,
        "qat_ops": len(qat_report.ops), "ptq_ops": len(ptq_report.ops),
        "qat_fully_int8": qat_report.is_fully_int8,
    }


def _fit_peak_rss(kind, name, size, steps):
    """Child process: peak RSS (MB) of a `fit` of `steps` batches, and how
    much the peak grew during the fit."""
    x, y = _data(size, BATCH * steps)
    model = _float_model(name, size)
    if kind == "qat":
        model = qat_plugin.quantize_model(model)
    _compiled(model)
    before = _peak_rss_mb()
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    peak = _peak_rss_mb()
    return {"rss_mb": peak, "grown_mb": peak - before}


def _peak_rss_mb():
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux
    carries the parent's peak at fork into a child's ru_maxrss."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("bench_speed: no VmHWM in /proc/self/status (Linux only).")


def _in_child(arguments, env=None):
    completed = subprocess.run(
        [sys.executable, *arguments], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, check=False)
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        return {"error": (completed.stderr or completed.stdout)[-1500:]}
    return json.loads(lines[-1])


def peak_rss(name, size, steps):
    runs = {kind: _in_child([__file__, "--child-rss", kind, f"{name}:{size}",
                             "--rss-steps", str(steps)])
            for kind in ("float", "qat")}
    if any("error" in run for run in runs.values()):
        return {"rss_error": next(run["error"] for run in runs.values() if "error" in run)}
    return {"float_rss_mb": runs["float"]["rss_mb"], "qat_rss_mb": runs["qat"]["rss_mb"],
            "rss_ratio": runs["qat"]["rss_mb"] / runs["float"]["rss_mb"],
            "float_grown_mb": runs["float"]["grown_mb"], "qat_grown_mb": runs["qat"]["grown_mb"]}


def tfmot_step(name, size, steps):
    run = _in_child([os.path.join(HERE, "_tfmot_speed_worker.py"), name, str(size),
                     str(BATCH), str(steps)], env={"TF_USE_LEGACY_KERAS": "1"})
    if "error" in run:
        return {"tfmot_error": run["error"].strip().splitlines()[-1][:300]}
    return {"tfmot_step_ratio": run["step_ratio"]}


def _cell(row, key, fmt):
    return "-" if row.get(key) is None else fmt.format(row[key])


def markdown(report):
    lines = [
        f"Speed at batch {BATCH} ({report['date']}; {report['machine']}). Command: "
        f"`{report['command']}`. Targets: step at most 1.15x float and below tfmot's, "
        "trace at most 1.3x, QAT export no slower than the converter's int8 PTQ, "
        "calibrate (32 samples) under 2 s on MobileNetV2, peak RSS at most 1.1x.",
        "",
        "| model | step float / QAT (ms) | step ratio | tfmot step ratio | trace float / QAT (s) "
        "| trace ratio | export QAT / PTQ (s) | export ratio | ops QAT / PTQ | calibrate 32 (s) "
        "| quantize_model (s) | peak RSS float / QAT (MB) | RSS ratio | grown in fit float / QAT (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, row in report["results"].items():
        lines.append(" | ".join([
            f"| {model}",
            f"{row['float_step_ms']:.0f} / {row['qat_step_ms']:.0f}",
            f"{row['step_ratio']:.2f}x",
            _cell(row, "tfmot_step_ratio", "{:.2f}x") if "tfmot_error" not in row else "see below",
            f"{row['float_trace_s']:.1f} / {row['qat_trace_s']:.1f}",
            f"{row['trace_ratio']:.2f}x",
            f"{row['qat_export_s']:.1f} / {row['ptq_export_s']:.1f}",
            f"{row['export_ratio']:.2f}x",
            f"{row['qat_ops']} / {row['ptq_ops']}",
            f"{row['calibrate_32_s']:.1f}",
            f"{row['quantize_model_s']:.1f}",
            "-" if "rss_ratio" not in row else f"{row['float_rss_mb']:.0f} / {row['qat_rss_mb']:.0f}",
            _cell(row, "rss_ratio", "{:.2f}x"),
            "-" if "rss_ratio" not in row else
            f"{row['float_grown_mb']:.0f} / {row['qat_grown_mb']:.0f} |",
        ]))
    errors = [f"- {model}: {row[key]}" for model, row in report["results"].items()
              for key in ("tfmot_error", "rss_error") if key in row]
    if errors:
        lines += ["", "Not measured:", *errors]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help="keras.applications constructors as NAME:SIZE")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model and kind")
    parser.add_argument("--rss-steps", type=int, default=8, help="batches of the RSS fits")
    parser.add_argument("--tfmot", action="store_true", help="also time tfmot's QAT step")
    parser.add_argument("--no-rss", action="store_true", help="leave out the RSS processes")
    parser.add_argument("--child-rss", nargs=2, metavar=("KIND", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--output", default=os.path.join(HERE, "results"))
    parser.add_argument("--stem", default="speed")
    args = parser.parse_args(argv)
    if args.child_rss:
        kind, model = args.child_rss
        name, size = model.split(":")
        print(json.dumps(_fit_peak_rss(kind, name, int(size), args.rss_steps)))
        return
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/bench_speed.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load "
                   f"{os.getloadavg()[0]:.1f} at start, keras {keras.__version__}",
        "results": {},
    }
    _warm_up()
    for model in args.models:
        name, size = model.split(":")
        row = measure(name, int(size), args.steps)
        if not args.no_rss:
            row.update(peak_rss(name, int(size), args.rss_steps))
        if args.tfmot:
            row.update(tfmot_step(name, int(size), args.steps))
        report["results"][f"{name} {size}x{size}"] = row
        print(json.dumps({model: row}), flush=True)
    text = markdown(report)
    write_results(args.output, args.stem, text, report)
    print(text)


if __name__ == "__main__":
    main()
