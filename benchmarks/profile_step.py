"""Where qat_plugin's QAT train step spends its time, by ablation.

Builds the benchmark architectures (benchmarks/_tfmot_models.py), and times
`train_on_batch` (batch 128, TensorFlow CPU) of the float model, of the
default `quantize_model` model, and of QAT models traced with one part of
the quantized step switched off or rewritten by a monkeypatch (active only
while the train function is traced; the engine files are not changed):

- no_observer: activation observers neither reduce min/max nor assign EMAs;
- no_weight_fq: kernels are BN-folded but not fake-quantized;
- no_act_fq: no FakeQuantWithMinMaxVars on activations (nor its gradient);
- no_bn_correction: no batch-statistics correction of the folded output
  (and no moving-statistics update).

All variants are traced first, then timed interleaved in rounds so that
load changes hit all of them alike. With --jit also float and QAT with
`jit_compile=True` (XLA). Writes benchmarks/results/tfmot_profile.{md,json}.

Usage:
    python benchmarks/profile_step.py [--steps 40] [--architectures mobilenet_v2 resnet] [--jit]
    python benchmarks/profile_step.py --architectures MobileNetV2:96 --batch-size 32
    PYTHONPATH=/path/to/patched/engine python benchmarks/profile_step.py --variants qat --jit --tag _patched
"""

import argparse
import contextlib
import os
import sys
import time
import traceback

import keras
import numpy as np

import qat_plugin
from qat_plugin import quantizers
from qat_plugin.layers import linear

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _results import write_results  # noqa: E402
import _tfmot_models as models  # noqa: E402


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _folded_only(self, outputs, folded_bias, bn_frozen):
    """The frozen-BN output: no batch moments, no moving-statistics update."""
    return outputs if folded_bias is None else self._add_channel_vector(outputs, folded_bias)


def _observe_nothing(self, x, frozen):
    return self.current_range()


@contextlib.contextmanager
def variant(name):
    with contextlib.ExitStack() as stack:
        enter = stack.enter_context
        if name == "no_observer":
            enter(patched(quantizers.ActivationQuantizer, "observe", _observe_nothing))
        elif name == "no_weight_fq":
            enter(patched(linear, "fake_quant_weight", lambda w, axes, bits=8: w))
        elif name == "no_act_fq":
            enter(patched(quantizers, "fake_quant_activation", lambda x, lo, hi, num_bits=8: x))
        elif name == "no_bn_correction":
            enter(patched(linear.QuantizedLinear, "_batch_norm_train", _folded_only))
        yield


VARIANTS = ("qat", "no_observer", "no_weight_fq", "no_act_fq", "no_bn_correction")


def architecture_builder(architecture):
    """`(build, input_shape)`: a benchmark architecture, or a keras.applications
    constructor given as NAME:SIZE (random weights, 10 classes)."""
    if ":" not in architecture:
        return models.ARCHITECTURES[architecture], models.INPUT_SHAPE
    name, size = architecture.split(":")
    shape = (int(size), int(size), 3)

    def build(keras_module):
        return getattr(keras_module.applications, name)(
            input_shape=shape, weights=None, classes=10, classifier_activation=None)

    return build, shape


def build_step_functions(architecture, batch, jit, variants=VARIANTS):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    build, input_shape = architecture_builder(architecture)
    rng = np.random.default_rng(0)
    x = rng.random((batch, *input_shape), dtype=np.float32)
    y = rng.integers(0, 10, batch).astype("int32")
    keras.utils.set_random_seed(0)
    float_model = build(keras)
    float_model.compile(keras.optimizers.Adam(1e-4), loss)
    # Settle BN statistics a little, as a trained model would have them.
    float_model.fit(x, y, batch_size=batch, epochs=2, verbose=0)
    weights = float_model.get_weights()
    functions, errors = {}, {}

    def add(name, model):
        functions[name] = model.train_on_batch
        model.train_on_batch(x, y)  # trace now, inside the variant's patches

    fresh = build(keras)
    fresh.set_weights(weights)
    fresh.compile(keras.optimizers.Adam(1e-4), loss)
    add("float", fresh)
    for name in variants:
        with variant(name):
            qat = qat_plugin.quantize_model(float_model)
            qat.compile(keras.optimizers.Adam(1e-4), loss)
            add(name, qat)
    if jit:
        for name, make in (("float_xla", lambda: build(keras)),
                           ("qat_xla", lambda: qat_plugin.quantize_model(float_model)),
                           ("proposed_xla", lambda: qat_plugin.quantize_model(float_model))):
            if name == "proposed_xla" and "proposed" not in variants:
                continue
            try:
                with variant("proposed" if name == "proposed_xla" else "qat"):
                    model = make()
                    if name == "float_xla":
                        model.set_weights(weights)
                    model.compile(keras.optimizers.Adam(1e-4), loss, jit_compile=True)
                    add(name, model)
            except Exception as error:  # report, keep profiling the rest
                errors[name] = "".join(traceback.format_exception_only(type(error), error))[-2000:]
    return functions, errors, x, y


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--architectures", nargs="+", default=list(models.ARCHITECTURES),
                        help="benchmark architectures, or keras.applications as NAME:SIZE "
                             "(e.g. MobileNetV2:96)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--jit", action="store_true", help="also time jit_compile=True (XLA)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="QAT variants to time (qat: the engine as installed)")
    parser.add_argument("--tag", default="", help="suffix of the output files")
    parser.add_argument("--output", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python benchmarks/profile_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "cores": os.cpu_count(), "load_average_at_start": os.getloadavg(),
              "keras": keras.__version__, "engine": os.path.dirname(qat_plugin.__file__),
              "results": {}}
    lines = [f"# QAT train-step profile ({report['date']}, {report['cores']} cores, "
             f"load {report['load_average_at_start'][0]:.1f}; shared machine, noisy)", "",
             f"Command: `{report['command']}`; engine: {os.path.dirname(qat_plugin.__file__)}", ""]
    for architecture in args.architectures:
        functions, errors, x, y = build_step_functions(
            architecture, args.batch_size, args.jit, args.variants)
        step_ms = models.median_step_ms(functions, x, y, args.steps, args.warmup)
        base_ms = step_ms["float"]
        report["results"][architecture] = {"step_ms": step_ms, "errors": errors}
        lines += [f"## {architecture} (batch {args.batch_size})", "",
                  "| variant | step (ms) | / float | saved vs qat (ms) |", "|---|---|---|---|"]
        for name, ms in step_ms.items():
            reference = step_ms["float_xla"] if name.endswith("_xla") and "float_xla" in step_ms else base_ms
            saved = step_ms["qat"] - ms if name in VARIANTS else float("nan")
            lines.append(f"| {name} | {ms:.1f} | {ms / reference:.2f} | {saved:.1f} |")
        for name, error in errors.items():
            lines.append(f"\n{name} failed: `{error.strip()}`")
        lines.append("")
        print("\n".join(lines[-(len(step_ms) + 4 + len(errors)):]), flush=True)
    write_results(args.output, f"tfmot_profile{args.tag}", "\n".join(lines), report)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
