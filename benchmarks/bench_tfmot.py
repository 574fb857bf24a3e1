"""qat_plugin against tfmot and PTQ on Fashion-MNIST: accuracy, overhead, export.

For each architecture (a small MobileNetV2 and a small ResNet) and seed:
train the float model in Keras 3 for a fixed budget (Adam, cosine decay),
then, from those same weights, with the same fine-tuning budget, optimizer
(Adam, cosine decay from --finetune-lr), batch size and sample order:

- float fine-tuned: the float model trained on (the fair float reference);
- PTQ int8: `qat_plugin.export_tflite(float_model, representative_data=...)`;
- qat_plugin QAT: `quantize_model` (default int8 recipe) with
  `QuantizationScheduler`, exported with `export_tflite`;
- tfmot QAT: the tf_keras twin of the architecture with the Keras 3 float
  weights copied in layer by layer (`.npz`), `tfmot.quantization.keras.
  quantize_model`, converted with optimizations=DEFAULT and int8 I/O; run in
  a subprocess (benchmarks/_tfmot_worker.py) because TF_USE_LEGACY_KERAS=1
  must be set before TensorFlow is imported.

Every int8 model is scored in the LiteRT interpreter (`TFLiteModel`) on the
test set. Training overhead is the median train-step time of the QAT model
over that of the float model (same architecture, batch, optimizer;
`train_on_batch` interleaved in rounds, after warm-up), measured for
qat_plugin in this process and for tfmot in the worker, in the same run.
Export figures: raw and gzip size, interpreter latency (XNNPACK, 1 and 2
threads, batch 1) and conversion time. Writes tfmot.md, tfmot.json,
tfmot_overhead.png and tfmot_table.png into benchmarks/results/ (with
--quick: tfmot_quick.*, a smoke run whose accuracies mean nothing).

Usage:
    python benchmarks/bench_tfmot.py --seeds 3        # full run, ~20-30 min on 2 cores
    python benchmarks/bench_tfmot.py --quick          # smoke run (~3 min quiet; ~7 min on a loaded 2-core box)
"""

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np

import qat_plugin
from qat_plugin.callbacks import QuantizationScheduler
from qat_plugin.analysis.compare import measure_latency
from qat_plugin.data.datasets import fashion_mnist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _results import write_results  # noqa: E402
import _tfmot_models as models  # noqa: E402

TOOLS = ("float_finetuned", "ptq_int8", "tfmot_qat_int8", "qat_plugin_qat_int8")
LABELS = {
    "float": "float (Keras)",
    "float_finetuned": "float fine-tuned (Keras)",
    "ptq_int8": "PTQ int8",
    "tfmot_qat_int8": "tfmot QAT int8",
    "qat_plugin_qat_int8": "qat_plugin QAT int8",
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--architectures", nargs="+", default=list(models.ARCHITECTURES),
                        choices=list(models.ARCHITECTURES))
    parser.add_argument("--float-epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--float-lr", type=float, default=2e-3)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-samples", type=int, default=60000)
    parser.add_argument("--test-samples", type=int, default=10000)
    # As recipes/int8.toml's schedule: BN never frozen, ranges frozen for the last fifth.
    parser.add_argument("--bn-freeze", type=float, default=None,
                        help="QuantizationScheduler bn_freeze, in fine-tune epochs (default never)")
    parser.add_argument("--range-freeze", type=float, default=0.8,
                        help="QuantizationScheduler range_freeze, in fine-tune epochs")
    parser.add_argument("--timing-steps", type=int, default=50)
    parser.add_argument("--timing-warmup", type=int, default=5)
    parser.add_argument("--latency-runs", type=int, default=200)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 seed, 6400 train / 1000 test images, 1+1 epochs")
    parser.add_argument("--output", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.float_epochs, args.finetune_epochs = 1, 1, 1
        args.train_samples, args.test_samples = 6400, 1000
        args.timing_steps, args.timing_warmup, args.latency_runs = 10, 3, 30
    return args


def machine():
    import tensorflow as tf
    import tf_keras
    import tensorflow_model_optimization as tfmot
    from importlib.metadata import version

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tf_keras": tf_keras.__version__,
        "tfmot": version("tensorflow-model-optimization"),
        "ai_edge_litert": version("ai-edge-litert"),
        "qat_plugin": qat_plugin.__version__,
    }


def interpreter_accuracy(tflite, x, y):
    predictions = qat_plugin.TFLiteModel(tflite).predict(x, batch_size=500)
    return float(np.mean(predictions.argmax(1) == y))


def export_figures(tflite, conversion_seconds, sample, runs):
    figures = {
        "raw_bytes": len(tflite),
        "gzip_bytes": len(gzip.compress(tflite, 9)),
        "conversion_seconds": conversion_seconds,
    }
    for threads in (1, 2):
        runner = qat_plugin.TFLiteModel(tflite, num_threads=threads)
        median, _ = measure_latency(runner, [sample], warmup_runs=10, runs=runs)
        figures[f"latency_ms_{threads}t"] = median
    return figures


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def compile_finetune(model, args, steps, loss):
    schedule = models.finetune_schedule(keras.optimizers.schedules, args.finetune_lr, steps)
    model.compile(keras.optimizers.Adam(schedule), loss, metrics=["accuracy"])


def fit_in_order(model, x, y, order, batch_size, callbacks=()):
    """Trains on the samples in `order` (epochs x samples), unshuffled.

    The epochs are concatenated into one `fit` epoch, so every tool sees the
    same batches and a `QuantizationScheduler` sees the whole budget.
    """
    flat = order.reshape(-1)
    model.fit(x[flat], y[flat], batch_size=batch_size, epochs=1, shuffle=False,
              verbose=0, callbacks=list(callbacks))


def run_tfmot(job, workdir):
    job_path = os.path.join(workdir, "job.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    completed = subprocess.run(
        [sys.executable, os.path.join(HERE, "_tfmot_worker.py"), job_path],
        env=env, capture_output=True, text=True,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"tfmot worker failed (exit {completed.returncode}) for {job['architecture']} "
            f"seed {job['seed']}:\n{completed.stderr[-4000:]}"
        )
    with open(job["result"]) as f:
        return json.load(f)


def run_seed(architecture, seed, data, args, workdir):
    build = models.ARCHITECTURES[architecture]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x_train, y_train = data.x_train[: args.train_samples], data.y_train[: args.train_samples]
    x_test, y_test = data.x_test[: args.test_samples], data.y_test[: args.test_samples]
    batch = args.batch_size
    steps_per_epoch = int(np.ceil(len(x_train) / batch))
    result = {"architecture": architecture, "seed": seed}

    keras.utils.set_random_seed(seed)
    model = build(keras)
    schedule = keras.optimizers.schedules.CosineDecay(
        args.float_lr, args.float_epochs * steps_per_epoch, alpha=0.05
    )
    model.compile(keras.optimizers.Adam(schedule), loss, metrics=["accuracy"])
    _, float_seconds = timed(lambda: model.fit(
        x_train, y_train, batch_size=batch, epochs=args.float_epochs, verbose=0))
    result["float_train_seconds"] = float_seconds
    result["accuracy"] = {"float": model.evaluate(x_test, y_test, batch_size=500, verbose=0)[1]}

    weights_path = os.path.join(workdir, f"{architecture}_{seed}_float.npz")
    np.savez(weights_path, **models.layer_weights(model))
    rng = np.random.default_rng(1000 + seed)
    order = np.stack([rng.permutation(len(x_train)) for _ in range(args.finetune_epochs)])
    order_path = os.path.join(workdir, f"{architecture}_{seed}_order.npy")
    np.save(order_path, order)
    finetune_steps = int(np.ceil(order.size / batch))

    # The fair float reference: same extra budget, optimizer and order.
    tuned = build(keras)
    models.set_layer_weights(tuned, dict(np.load(weights_path)))
    compile_finetune(tuned, args, finetune_steps, loss)
    fit_in_order(tuned, x_train, y_train, order, batch)
    result["accuracy"]["float_finetuned"] = tuned.evaluate(x_test, y_test, batch_size=500, verbose=0)[1]

    exports = {}
    float_tflite, seconds = timed(lambda: qat_plugin.export_tflite(model))
    exports["float"] = (float_tflite, seconds)
    ptq_tflite, seconds = timed(lambda: qat_plugin.export_tflite(
        model, representative_data=x_train[:500], calibration_steps=200))
    exports["ptq_int8"] = (ptq_tflite, seconds)
    result["accuracy"]["ptq_int8"] = interpreter_accuracy(ptq_tflite, x_test, y_test)

    qat = qat_plugin.quantize_model(model)
    compile_finetune(qat, args, finetune_steps, loss)
    scheduler = QuantizationScheduler(
        quantize_start=0,
        bn_freeze=None if args.bn_freeze is None else args.bn_freeze * args.finetune_epochs,
        range_freeze=args.range_freeze * args.finetune_epochs, unit="epoch",
        steps_per_epoch=steps_per_epoch,
    )
    _, qat_seconds = timed(lambda: fit_in_order(
        qat, x_train, y_train, order, batch, callbacks=[scheduler]))
    result["qat_plugin_train_seconds"] = qat_seconds
    result["accuracy"]["qat_plugin_keras"] = qat.evaluate(x_test, y_test, batch_size=500, verbose=0)[1]
    qat_tflite, seconds = timed(lambda: qat_plugin.export_tflite(qat))
    exports["qat_plugin_qat_int8"] = (qat_tflite, seconds)
    result["accuracy"]["qat_plugin_qat_int8"] = interpreter_accuracy(qat_tflite, x_test, y_test)
    result["qat_plugin_fully_int8"] = qat_plugin.inspect_tflite(qat_tflite).is_fully_int8

    # Step-time ratio: fresh copies from the same float weights, interleaved.
    float_copy = build(keras)
    models.set_layer_weights(float_copy, dict(np.load(weights_path)))
    float_copy.compile(keras.optimizers.Adam(1e-4), loss)
    qat_copy = qat_plugin.quantize_model(float_copy)
    qat_copy.compile(keras.optimizers.Adam(1e-4), loss)
    step_ms = models.median_step_ms(
        {"float": float_copy.train_on_batch, "qat": qat_copy.train_on_batch},
        x_train[:batch], y_train[:batch], args.timing_steps, args.timing_warmup,
    )
    result["qat_plugin_step_ms"] = step_ms
    result["qat_plugin_step_ratio"] = step_ms["qat"] / step_ms["float"]

    tfmot_tflite_path = os.path.join(workdir, f"{architecture}_{seed}_tfmot.tflite")
    tfmot = run_tfmot({
        "architecture": architecture, "seed": seed, "weights": weights_path,
        "order": order_path, "batch_size": batch, "learning_rate": args.finetune_lr,
        "test_samples": args.test_samples, "timing_steps": args.timing_steps,
        "timing_warmup": args.timing_warmup, "tflite": tfmot_tflite_path,
        "result": os.path.join(workdir, f"{architecture}_{seed}_tfmot.json"),
    }, workdir)
    with open(tfmot_tflite_path, "rb") as f:
        tfmot_tflite = f.read()
    exports["tfmot_qat_int8"] = (tfmot_tflite, tfmot["conversion_seconds"])
    result["accuracy"]["tfmot_qat_int8"] = interpreter_accuracy(tfmot_tflite, x_test, y_test)
    result["accuracy"]["tfmot_keras"] = tfmot["qat_keras_accuracy"]
    result["tfmot_twin_float_accuracy"] = tfmot["twin_float_accuracy"]
    result["tfmot_step_ms"] = tfmot["step_ms"]
    result["tfmot_step_ratio"] = tfmot["step_ratio"]
    result["tfmot_train_seconds"] = tfmot["train_seconds"]
    result["tfmot_fully_int8"] = qat_plugin.inspect_tflite(tfmot_tflite).is_fully_int8
    result["versions_worker"] = tfmot["versions"]

    result["export"] = {
        name: export_figures(data_, seconds, x_test[:1], args.latency_runs)
        for name, (data_, seconds) in exports.items()
    }
    result["accuracy"] = {k: float(v) for k, v in result["accuracy"].items()}
    return result


def spread(values):
    values = np.asarray(values, float)
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "min": float(values.min()),
        "max": float(values.max()),
        "n": int(len(values)),
    }


def summarize(runs, architectures):
    summary = {}
    for arch in architectures:
        rows = [r for r in runs if r["architecture"] == arch]
        accuracy = {key: spread([r["accuracy"][key] for r in rows]) for key in rows[0]["accuracy"]}
        exports = {
            name: {k: float(np.median([r["export"][name][k] for r in rows]))
                   for k in rows[0]["export"][name]}
            for name in rows[0]["export"]
        }
        summary[arch] = {
            "accuracy": accuracy,
            "qat_plugin_step_ratio": spread([r["qat_plugin_step_ratio"] for r in rows]),
            "tfmot_step_ratio": spread([r["tfmot_step_ratio"] for r in rows]),
            "qat_plugin_step_ms": {k: float(np.median([r["qat_plugin_step_ms"][k] for r in rows]))
                                   for k in ("float", "qat")},
            "tfmot_step_ms": {k: float(np.median([r["tfmot_step_ms"][k] for r in rows]))
                              for k in ("float", "qat")},
            "export_median": exports,
        }
        acc = accuracy
        ours = acc["qat_plugin_qat_int8"]["mean"]
        summary[arch]["targets"] = {
            "qat_plugin >= tfmot (int8, mean)": ours >= acc["tfmot_qat_int8"]["mean"],
            "qat_plugin >= PTQ (int8, mean)": ours >= acc["ptq_int8"]["mean"],
            "qat_plugin within 0.3 points of float fine-tuned":
                ours >= acc["float_finetuned"]["mean"] - 0.003,
            "qat_plugin step ratio <= 1.25":
                summary[arch]["qat_plugin_step_ratio"]["mean"] <= 1.25,
            "qat_plugin step ratio < tfmot's":
                summary[arch]["qat_plugin_step_ratio"]["mean"]
                < summary[arch]["tfmot_step_ratio"]["mean"],
        }
    return summary


def fmt_acc(s):
    text = f"{100 * s['mean']:.2f}"
    if s["n"] > 1:
        text += f" ± {100 * s['std']:.2f} ({100 * s['min']:.2f}–{100 * s['max']:.2f})"
    return text


def fmt_ratio(s):
    text = f"{s['mean']:.2f}"
    if s["n"] > 1:
        text += f" ± {s['std']:.2f}"
    return text


def accuracy_rows(summary):
    keys = ("float", "float_finetuned", "ptq_int8", "tfmot_qat_int8", "qat_plugin_qat_int8")
    rows = []
    for arch, s in summary.items():
        for key in keys:
            overhead = {"tfmot_qat_int8": fmt_ratio(s["tfmot_step_ratio"]),
                        "qat_plugin_qat_int8": fmt_ratio(s["qat_plugin_step_ratio"])}.get(key, "-")
            if key in ("float_finetuned",):
                overhead = "1.00"
            rows.append([arch, LABELS[key], fmt_acc(s["accuracy"][key]), overhead])
    return rows


def markdown(report):
    args, summary = report["args"], report["summary"]
    m = report["machine"]
    lines = [
        "# qat_plugin vs tfmot vs PTQ on Fashion-MNIST" + (" (QUICK SMOKE RUN: accuracies mean nothing)" if args["quick"] else ""),
        "",
        f"Date: {report['date']}. Command: `{report['command']}`.",
        f"Machine: {m['processor']}, {m['cpu_count']} cores (load average at start "
        f"{', '.join(f'{v:.1f}' for v in m['load_average_at_start'] or [])}), Python {m['python']}, "
        f"TensorFlow {m['tensorflow']}, Keras {m['keras']}, tf_keras {m['tf_keras']}, "
        f"tfmot {m['tfmot']}, ai-edge-litert {m['ai_edge_litert']}, qat_plugin {m['qat_plugin']}.",
        f"Budget per seed: {args['float_epochs']} float epochs (Adam, cosine decay from "
        f"{args['float_lr']:g}) on {args['train_samples']} training images, then "
        f"{args['finetune_epochs']} fine-tuning epoch(s) (Adam, cosine decay from "
        f"{args['finetune_lr']:g} to a tenth, batch {args['batch_size']}, the same sample order) for "
        "float, tfmot and qat_plugin. tfmot starts from the Keras 3 float weights copied layer by "
        "layer into its tf_keras twin. qat_plugin: default int8 recipe, QuantizationScheduler("
        f"quantize_start=0, bn_freeze={args['bn_freeze']}, range_freeze={args['range_freeze']:g} "
        "epochs of the fine-tune). PTQ: export_tflite(float_model, representative_data=500 "
        f"training images, 200 calibration samples). Test accuracy on {args['test_samples']} "
        f"images, int8 models in the LiteRT interpreter; mean ± std (min–max) over "
        f"{args['seeds']} seed(s).",
        "",
        "## Accuracy (%) and training overhead (QAT step / float step)",
        "",
        "| architecture | model | accuracy | step-time ratio |",
        "|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in accuracy_rows(summary)]
    lines += [
        "",
        "Step times: median `train_on_batch` time (batch "
        f"{args['batch_size']}) over {args['timing_steps']} steps after {args['timing_warmup']} "
        "warm-up steps, float and QAT interleaved in 5 rounds; qat_plugin in the main process "
        "(Keras 3), tfmot in its worker (tf_keras). The machine was shared: absolute times are "
        "noisy, read the ratios.",
        "",
        "| architecture | tool | float step (ms) | QAT step (ms) | ratio |",
        "|---|---|---|---|---|",
    ]
    for arch, s in summary.items():
        for tool in ("qat_plugin", "tfmot"):
            ms = s[f"{tool}_step_ms"]
            lines.append(f"| {arch} | {tool} | {ms['float']:.1f} | {ms['qat']:.1f} | "
                         f"{fmt_ratio(s[f'{tool}_step_ratio'])} |")
    lines += [
        "",
        "## Export (median over seeds)",
        "",
        "| architecture | model | size (bytes) | gzip (bytes) | latency 1 thread (ms) | "
        "latency 2 threads (ms) | conversion (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arch, s in summary.items():
        for name in ("float", "ptq_int8", "tfmot_qat_int8", "qat_plugin_qat_int8"):
            e = s["export_median"][name]
            label = "float (.tflite)" if name == "float" else LABELS[name]
            lines.append(
                f"| {arch} | {label} | {e['raw_bytes']:.0f} | {e['gzip_bytes']:.0f} | "
                f"{e['latency_ms_1t']:.3f} | {e['latency_ms_2t']:.3f} | {e['conversion_seconds']:.1f} |"
            )
    lines += ["", "Latency: batch 1, XNNPACK (default delegate), median of "
              f"{args['latency_runs']} `invoke()` calls after 10 warm-up calls.", "", "## Targets", ""]
    for arch, s in summary.items():
        for name, met in s["targets"].items():
            lines.append(f"- {arch}: {name}: {'met' if met else 'NOT met'}")
    lines.append("")
    return "\n".join(lines)


def plots(report, directory, stem):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    colors = {"float_finetuned": "tab:gray", "ptq_int8": "tab:orange",
              "tfmot_qat_int8": "tab:blue", "qat_plugin_qat_int8": "tab:green"}
    markers = ["o", "s", "^", "D"]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for marker, (arch, s) in zip(markers, summary.items()):
        overhead = {"float_finetuned": {"mean": 1.0, "std": 0.0}, "ptq_int8": {"mean": 1.0, "std": 0.0},
                    "tfmot_qat_int8": s["tfmot_step_ratio"],
                    "qat_plugin_qat_int8": s["qat_plugin_step_ratio"]}
        for tool in TOOLS:
            acc = s["accuracy"][tool]
            x, y = overhead[tool]["mean"], 100 * acc["mean"]
            axes.errorbar(x, y, xerr=overhead[tool]["std"], yerr=100 * acc["std"], fmt="none",
                          ecolor=colors[tool], capsize=3)
            axes.plot([x], [y], marker, color=colors[tool], markersize=8,
                      label=f"{LABELS[tool]} ({arch})")
    axes.set_xlabel("training step time / float step time (PTQ, float: 1)")
    axes.set_ylabel("test accuracy (%)")
    title = "Fashion-MNIST: accuracy vs QAT training overhead"
    if report["args"]["quick"]:
        title += " (smoke run)"
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    figure.text(0.01, 0.01, f"{report['date']}, {report['machine']['cpu_count']} cores, "
                f"{report['command']}", fontsize=6)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    figure.savefig(os.path.join(directory, f"{stem}_overhead.png"), dpi=130)
    plt.close(figure)

    rows = accuracy_rows(summary)
    figure, axes = plt.subplots(figsize=(7.5, 0.25 * len(rows) + 0.6))
    axes.axis("off")
    table = axes.table(cellText=rows, colLabels=["architecture", "model", "accuracy (%)",
                                                   "step-time ratio"], loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.auto_set_column_width(range(4))
    axes.set_title(f"{title.split(':')[0]} int8 accuracy, {report['args']['seeds']} seed(s); "
                   f"{report['date']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(os.path.join(directory, f"{stem}_table.png"), dpi=130, bbox_inches="tight")
    plt.close(figure)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    data = fashion_mnist(download=False, synthetic=False)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python benchmarks/bench_tfmot.py", *argv]),
        "machine": machine(),
        "dataset": data.source,
        "args": vars(args),
    }
    runs = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_tfmot_") as workdir:
        for architecture in args.architectures:
            for seed in range(args.seeds):
                print(f"[{time.perf_counter() - start:6.0f}s] {architecture} seed {seed}", flush=True)
                result = run_seed(architecture, seed, data, args, workdir)
                runs.append(result)
                acc = result["accuracy"]
                print("    " + ", ".join(f"{k} {100 * v:.2f}" for k, v in acc.items())
                      + f"; step ratio qat_plugin {result['qat_plugin_step_ratio']:.2f}, "
                      f"tfmot {result['tfmot_step_ratio']:.2f}", flush=True)
    report["wall_seconds"] = time.perf_counter() - start
    report["runs"] = runs
    report["summary"] = summarize(runs, args.architectures)
    stem = "tfmot_quick" if args.quick else "tfmot"
    text = markdown(report)
    write_results(args.output, stem, text, report)
    plots(report, args.output, stem)
    print(text)
    print(f"Wrote {stem}.md/.json/_overhead.png/_table.png to {args.output} "
          f"in {report['wall_seconds']:.0f} s.")


if __name__ == "__main__":
    main()
