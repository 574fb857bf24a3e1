"""A small transformer classifier fully int8: Fashion-MNIST rows as 28 tokens.

Measures the project's transformer target: a small transformer classifier
(Fashion-MNIST image rows as a 28-token sequence) trained in float, then
QAT for one epoch: int8 interpreter accuracy at least the PTQ int8 accuracy
and within 1 point of the float model fine-tuned for the same epoch,
measured over 3 seeds.

Each image is a sequence of 28 rows (tokens) of 28 features. The model:
Dense(d) token projection plus a learned position embedding (keras-hub's
PositionEmbedding, which qat_plugin exports as an int8 constant), then
pre-norm encoder blocks (LayerNormalization, MultiHeadAttention, residual
Add, LayerNormalization, Dense(4d, gelu), Dense(d), residual Add),
GlobalAveragePooling1D and Dense(10). For each seed it trains in float,
then fine-tunes the float model one more epoch at the QAT learning rate
(the control) and, separately, QAT (the default recipe `int8`, or
--recipe, with its schedule's callbacks: ranges freeze for the last fifth
of the epoch) for the same epoch, learning rate and batch size, and
exports it fully int8. The converter's
full-int8 PTQ of the float model is the baseline. Reports, per seed and
as means: float, control, QAT int8 and PTQ int8 accuracies (the .tflite
files in LiteRT), the QAT - control gap, whether the target holds ("within
1 point": QAT int8 at most 1 point below the control), the ops
(and float ops) of both exports and QAT-model vs LiteRT parity. Half the
training images and the whole test set by default (--train / --test; the
results say so): the 3 seeds take about 10 minutes on two cores. Writes
benchmarks/results/transformer.md and transformer.json.

A quantize_model that refuses a layer stops the run.

Usage:
    python benchmarks/bench_transformer.py [--seeds 0,1,2] [--train 30000]
"""

import argparse
import os
import platform
import sys
import time

import keras
import numpy as np

import qat_plugin
from qat_plugin.data.datasets import fashion_mnist
from _results import write_results

L = keras.layers
SEQUENCE = 28  # Tokens (image rows), each of 28 features.
TARGET_GAP = 0.01  # QAT int8 at most 1 point below the control.


def build_model(args):
    inputs = keras.Input((SEQUENCE, 28))
    x = L.Dense(args.dim, name="token_projection")(inputs)
    if args.positions == "learned":
        try:
            import keras_hub
        except ImportError:
            sys.exit("The learned position embedding needs keras-hub (the dev "
                     "extra: pip install -e '.[dev]'), or run with --positions none.")
        positions = keras_hub.layers.PositionEmbedding(SEQUENCE, name="positions")(x)
        x = L.Add(name="add_positions")([x, positions])
    for block in range(args.blocks):
        name = f"block{block}"
        h = L.LayerNormalization(epsilon=1e-6, name=f"{name}_norm1")(x)
        h = L.MultiHeadAttention(args.heads, args.key_dim, name=f"{name}_attention")(h, h)
        x = L.Add(name=f"{name}_add1")([x, h])
        h = L.LayerNormalization(epsilon=1e-6, name=f"{name}_norm2")(x)
        h = L.Dense(4 * args.dim, activation="gelu", name=f"{name}_mlp1")(h)
        h = L.Dense(args.dim, name=f"{name}_mlp2")(h)
        x = L.Add(name=f"{name}_add2")([x, h])
    x = L.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(inputs, L.Dense(10, name="logits")(x), name="transformer_classifier")


def tflite_accuracy(data, x, y):
    return float(np.mean(qat_plugin.TFLiteModel(data).predict(x, batch_size=500)
                         .argmax(1) == y))


def op_summary(report):
    return {
        "ops": len(report.ops),
        "fully_int8": report.is_fully_int8,
        "float_ops": [f"{op.name}#{op.index}" for op in report.float_ops],
        "size_bytes": report.size_bytes,
    }


def quantize(model, recipe):
    """`recipe.quantize`, stopping the run (not continuing) where it refuses."""
    try:
        return recipe.quantize(model)
    except Exception as error:
        print(f"bench_transformer: quantize_model failed: {type(error).__name__}: "
              f"{error}", file=sys.stderr)
        raise


def run(seed, args, x_train, y_train, x_test, y_test):
    start_seed = time.time()
    keras.utils.set_random_seed(seed)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = build_model(args)
    steps = args.float_epochs * int(np.ceil(len(x_train) / args.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(args.float_lr, steps, alpha=0.1)
    model.compile(keras.optimizers.Adam(schedule, clipnorm=1.0), loss,
                  metrics=["accuracy"])
    start = time.time()
    model.fit(x_train, y_train, epochs=args.float_epochs, batch_size=args.batch_size,
              verbose=2)
    float_seconds = time.time() - start
    float_accuracy = model.evaluate(x_test, y_test, verbose=0)[1]

    # Quantized before the control trains, so that a refusal stops the run
    # before any more training time is spent.
    recipe = qat_plugin.recipes.get(args.recipe)
    qat = quantize(model, recipe)

    control = keras.models.clone_model(model)
    control.set_weights(model.get_weights())
    control.compile(keras.optimizers.Adam(args.lr), loss, metrics=["accuracy"])
    start = time.time()
    control.fit(x_train, y_train, epochs=1, batch_size=args.batch_size, verbose=2)
    control_seconds = time.time() - start
    control_accuracy = control.evaluate(x_test, y_test, verbose=0)[1]

    qat.compile(keras.optimizers.Adam(args.lr), loss, metrics=["accuracy"])
    start = time.time()
    steps_per_epoch = -(-len(x_train) // args.batch_size)
    qat.fit(x_train, y_train, epochs=1, batch_size=args.batch_size, verbose=2,
            callbacks=recipe.callbacks(qat, steps_per_epoch=steps_per_epoch))
    qat_seconds = time.time() - start
    qat_data = qat_plugin.export_tflite(qat)
    qat_report = op_summary(qat_plugin.inspect_tflite(qat_data))
    parity = qat_plugin.measure_parity(qat, qat_data, x_test)
    qat_accuracy = tflite_accuracy(qat_data, x_test, y_test)
    try:
        ptq_data = qat_plugin.export_tflite(
            model, mode="int8", representative_data=x_train[:200], calibration_steps=200)
        ptq_accuracy = tflite_accuracy(ptq_data, x_test, y_test)
        ptq_report = op_summary(qat_plugin.inspect_tflite(ptq_data))
    except Exception as error:  # Reported, not hidden: the row says why.
        ptq_accuracy = None
        ptq_report = {"ops": None, "fully_int8": f"failed: {str(error)[:200]}",
                      "float_ops": None, "size_bytes": None}
    gap = qat_accuracy - float(control_accuracy)
    return {
        "float_accuracy": float(float_accuracy),
        "control_accuracy": float(control_accuracy),
        "qat_int8_accuracy": qat_accuracy,
        "ptq_int8_accuracy": ptq_accuracy,
        "qat_minus_control": gap,
        "qat_at_least_ptq": None if ptq_accuracy is None else qat_accuracy >= ptq_accuracy,
        "qat_within_1_point_of_control": gap >= -TARGET_GAP,
        "qat_export": qat_report,
        "ptq_export": ptq_report,
        "parity_top1_agreement": float(parity.agreement[0]),
        "parity_max_error_steps": float(parity.max_error_steps[0]),
        "parameters": int(model.count_params()),
        "float_training_seconds": float_seconds,
        "control_epoch_seconds": control_seconds,
        "qat_epoch_seconds": qat_seconds,
        "seed_seconds": time.time() - start_seed,
    }


def summarize(results):
    """Means over the seeds and the target's verdict on them."""
    def mean(key):
        values = [r[key] for r in results.values()]
        return None if any(v is None for v in values) else float(np.mean(values))

    def std(key):
        values = [r[key] for r in results.values()]
        return None if any(v is None for v in values) else float(np.std(values))

    keys = ("float_accuracy", "control_accuracy", "qat_int8_accuracy",
            "ptq_int8_accuracy", "qat_minus_control")
    summary = {f"mean_{k}": mean(k) for k in keys}
    summary.update({f"std_{k}": std(k) for k in keys})
    qat, ptq = summary["mean_qat_int8_accuracy"], summary["mean_ptq_int8_accuracy"]
    summary["mean_qat_at_least_ptq"] = None if ptq is None else qat >= ptq
    summary["mean_qat_within_1_point_of_control"] = (
        summary["mean_qat_minus_control"] >= -TARGET_GAP)
    summary["every_seed_meets_target"] = all(
        r["qat_at_least_ptq"] and r["qat_within_1_point_of_control"]
        for r in results.values())
    summary["target_met"] = bool(summary["mean_qat_at_least_ptq"]
                                 and summary["mean_qat_within_1_point_of_control"])
    return summary


def _fmt(value, digits=4):
    return "-" if value is None else f"{value:.{digits}f}"


def _float_ops(report):
    if report["float_ops"] is None:
        return "-"
    return str(len(report["float_ops"]))


def table(args, results, summary, machine, minutes):
    skip_note = "Every layer quantized (no `skip=`)."
    lines = [
        "Target: a small transformer classifier (Fashion-MNIST image rows as a "
        "28-token sequence) trained in float, then QAT for one epoch: int8 "
        "interpreter accuracy at least the PTQ int8 accuracy and within 1 point "
        "of the float model fine-tuned for the same epoch, measured over 3 seeds.",
        "",
        f"Fashion-MNIST rows as 28 tokens; {args.train} training and {args.test} "
        f"test images; d={args.dim}, {args.blocks} pre-norm encoder block(s) of "
        f"MultiHeadAttention({args.heads} heads, key_dim {args.key_dim}) and a "
        f"Dense({4 * args.dim}, gelu) MLP, position embedding: {args.positions}; "
        f"float {args.float_epochs} epochs (Adam, cosine decay from "
        f"{args.float_lr}), then 1 epoch at lr {args.lr} (batch {args.batch_size}) "
        f"for the float control and for QAT (recipe `{args.recipe}`). "
        f"Seeds {args.seeds}. {skip_note} "
        f"Accuracies of the .tflite files are LiteRT's.",
        "",
        "| seed | float | float +1 epoch (control) | QAT int8 (LiteRT) | PTQ int8 "
        "(LiteRT) | QAT - control | QAT >= PTQ | QAT >= control - 1 point | ops (QAT / PTQ) | "
        "float ops (QAT / PTQ) | parity top-1 | parity max error (steps) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seed, r in results.items():
        lines.append(
            f"| {seed} | {r['float_accuracy']:.4f} | {r['control_accuracy']:.4f} | "
            f"{r['qat_int8_accuracy']:.4f} | {_fmt(r['ptq_int8_accuracy'])} | "
            f"{r['qat_minus_control'] * 100:+.2f} pts | {r['qat_at_least_ptq']} | "
            f"{r['qat_within_1_point_of_control']} | "
            f"{r['qat_export']['ops']} / {r['ptq_export']['ops'] or '-'} | "
            f"{_float_ops(r['qat_export'])} / {_float_ops(r['ptq_export'])} | "
            f"{r['parity_top1_agreement']:.4f} | {r['parity_max_error_steps']:.2f} |")
    s = summary
    lines.append(
        f"| mean | {_fmt(s['mean_float_accuracy'])} | {_fmt(s['mean_control_accuracy'])} | "
        f"{_fmt(s['mean_qat_int8_accuracy'])} | {_fmt(s['mean_ptq_int8_accuracy'])} | "
        f"{s['mean_qat_minus_control'] * 100:+.2f} pts | {s['mean_qat_at_least_ptq']} | "
        f"{s['mean_qat_within_1_point_of_control']} | | | | |")
    lines += ["", f"Target met (on the means): {s['target_met']}; on every seed: "
              f"{s['every_seed_meets_target']}."]
    first = next(iter(results.values()))
    for kind in ("qat_export", "ptq_export"):
        ops = first[kind]["float_ops"]
        if ops:
            lines.append(f"Float ops of the {kind.split('_')[0].upper()} export "
                         f"(seed {next(iter(results))}): {', '.join(ops)}.")
    lines += ["", f"Machine: {machine}; {minutes:.1f} min wall."]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--key-dim", type=int, default=16)
    parser.add_argument("--positions", choices=("learned", "none"), default="learned")
    parser.add_argument("--float-epochs", type=int, default=5)
    parser.add_argument("--float-lr", type=float, default=2e-3)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--recipe", default="int8",
                        help="the QAT recipe (default: int8, the default recipe, "
                             "whose ranges freeze for the last fifth of the epoch)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train", type=int, default=30000)
    parser.add_argument("--test", type=int, default=10000)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    start = time.time()
    data = fashion_mnist()
    if data.is_synthetic:
        sys.exit("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist).")
    x_train = data.x_train[: args.train].reshape(-1, SEQUENCE, 28)
    x_test = data.x_test[: args.test].reshape(-1, SEQUENCE, 28)
    y_train, y_test = data.y_train[: args.train], data.y_test[: args.test]
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {seed: run(seed, args, x_train, y_train, x_test, y_test) for seed in seeds}
    summary = summarize(results)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, Python "
               f"{platform.python_version()}, keras {keras.__version__}")
    minutes = (time.time() - start) / 60
    text = table(args, results, summary, machine, minutes)
    print(text)
    figures = {
        "results": {str(seed): r for seed, r in results.items()},
        "summary": summary,
        "args": vars(args),
        "machine": machine,
        "wall_minutes": minutes,
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/bench_transformer.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
    }
    write_results(args.output, "transformer", text, figures)


if __name__ == "__main__":
    main()
