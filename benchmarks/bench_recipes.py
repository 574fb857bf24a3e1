"""Every built-in recipe on Fashion-MNIST: accuracy, size, sparsity, target check.

Trains the small CNN with BatchNorm of bench_schedule.py in float (2 epochs
on the full 60k by default, so the BatchNorm statistics settle), then runs
each built-in recipe from those weights, exactly as a user would:
`recipe.prune` and a pruning epoch with `recipe.callbacks(pruned)` (pruning
recipes), `recipe.quantize` and one QAT epoch with `recipe.callbacks(qat)`,
`recipe.export_tflite` (checked against the recipe's target), then scores
the .tflite in the LiteRT interpreter on the 10k test set. Two controls back
the int8 defaults: the schedule bench_schedule.py tried (delayed start, BN
freeze halfway) and int8-fast (nothing frozen).

Prints a Markdown table and writes benchmarks/results/recipes.{md,json}.
Timings are wall-clock on a shared machine: noisy.

Usage: python benchmarks/bench_recipes.py [--float-epochs 2] [--train-samples N]
"""

import argparse
import hashlib
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import qat_plugin  # noqa: E402
from qat_plugin import recipes  # noqa: E402
from qat_plugin.data.datasets import fashion_mnist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import write_results  # noqa: E402
from bench_schedule import compile_model, small_cnn  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def candidates():
    """`(label, recipe)` pairs: every built-in recipe and the controls."""
    rows = [(name, recipes.get(name)) for name in recipes.names()]
    rows.append((
        "int8 + delayed start 0.1, BN freeze 0.5 (bench_schedule's schedule)",
        recipes.get("int8").replace(schedule={"quantize_start": 0.1, "bn_freeze": 0.5}),
    ))
    return rows


def run_recipe(recipe, float_model, train, test, batch_size, seed):
    keras.utils.set_random_seed(seed)
    steps_per_epoch = -(-len(train[0]) // batch_size)
    start = time.perf_counter()
    model = float_model
    if recipe.pruning.enabled:
        # 2:4 leaves the 1-channel stem dense (recipe.prune's default skip).
        model = recipe.prune(float_model, steps_per_epoch=steps_per_epoch)
        compile_model(model, 1e-4)
        model.fit(*train, batch_size=batch_size, epochs=recipe.pruning.epochs,
                  verbose=0, callbacks=recipe.callbacks(model))
    qat = recipe.quantize(model)
    compile_model(qat, 1e-4)
    qat.fit(*train, batch_size=batch_size, epochs=1, verbose=0,
            callbacks=recipe.callbacks(qat, steps_per_epoch=steps_per_epoch))
    seconds = time.perf_counter() - start
    data = recipe.export_tflite(qat)
    report = qat_plugin.inspect_tflite(data, targets=("cpu", "gpu", "mcu"))
    predictions = qat_plugin.TFLiteModel(data).predict(test[0])
    accuracy = float(np.mean(predictions.argmax(1) == test[1]))
    mcu = report.target("mcu")
    return {
        "int8_accuracy": accuracy,
        "sha1": hashlib.sha1(data).hexdigest(),
        "seconds": seconds,
        "size_bytes": report.size_bytes,
        "gzip_bytes": report.gzip_size_bytes,
        "weight_sparsity": report.weight_sparsity,
        "weight_scales": "per channel"
        if any(w.tensor.per_channel for w in report.weights) else "per tensor",
        "activations": report.inputs[0].dtype,
        "target": recipe.export.target,
        "cpu": report.target("cpu").compatible,
        "gpu": report.target("gpu").compatible,
        "mcu": mcu.compatible,
        "xnnpack": report.target("cpu").notes[0] if report.target("cpu").notes else "",
        "arena_bytes": mcu.arena.arena_bytes,
        "weight_bytes": mcu.arena.weight_bytes,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-samples", type=int, help="use only N training images")
    parser.add_argument("--seed", type=int, default=1000)
    args = parser.parse_args()

    data = fashion_mnist(synthetic=False)
    train = (data.x_train[: args.train_samples], data.y_train[: args.train_samples])
    test = (data.x_test, data.y_test)
    keras.utils.set_random_seed(0)
    float_model = small_cnn()
    compile_model(float_model, 1e-3)
    start = time.perf_counter()
    float_model.fit(*train, epochs=args.float_epochs, batch_size=args.batch_size, verbose=0)
    float_seconds = time.perf_counter() - start
    float_accuracy = float_model.evaluate(*test, verbose=0, return_dict=True)["accuracy"]

    results = {}
    for label, recipe in candidates():
        print(f"running {label} ...", flush=True)
        results[label] = run_recipe(recipe, float_model, train, test, args.batch_size, args.seed)

    steps = -(-len(train[0]) // args.batch_size)
    lines = [
        f"Fashion-MNIST ({data.source}), small CNN with BN (bench_schedule.py): float "
        f"{args.float_epochs} epochs ({args.float_epochs * steps} steps, "
        f"{float_seconds:.0f} s), float accuracy {float_accuracy:.4f} (Keras). Each "
        f"recipe: a pruning epoch where it prunes, then 1 QAT epoch ({steps} steps, "
        f"Adam 1e-4), batch {args.batch_size}; accuracy of the exported .tflite in "
        "LiteRT on the 10k test set. Times are wall-clock on a shared 2-core "
        "machine: noisy.",
        "",
        "| recipe | int8 acc. (LiteRT) | weight scales | activations | weight sparsity "
        "| size (B) | gzip (B) | target | cpu / gpu / mcu | mcu arena (B) | train (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    yes = {True: "yes", False: "no"}
    for label, r in results.items():
        lines.append(
            f"| {label} | {r['int8_accuracy']:.4f} | {r['weight_scales']} | "
            f"{r['activations']} | {r['weight_sparsity']:.1%} | {r['size_bytes']} | "
            f"{r['gzip_bytes']} | {r['target']} | {yes[r['cpu']]} / {yes[r['gpu']]} / "
            f"{yes[r['mcu']]} | {r['arena_bytes']} | {r['seconds']:.0f} |"
        )
    lines += ["", "cpu notes: " + "; ".join(
        f"{label}: {r['xnnpack']}" for label, r in results.items()
        if label in recipes.names()
    )]
    table = "\n".join(lines)
    print("\n" + table)
    write_results(
        RESULTS, "recipes", table,
        {"float_accuracy": float_accuracy, "args": vars(args), "results": results},
    )


if __name__ == "__main__":
    main()
