"""tfmot's QAT/float train-step ratio of a keras.applications model, for bench_speed.py.

tfmot 0.8.1 works only with tf_keras (`TF_USE_LEGACY_KERAS=1` set before
TensorFlow is imported), so bench_speed.py runs this in its own process. It
builds the architecture in tf_keras (random weights, 10 classes), wraps it
with `tfmot.quantization.keras.quantize_model` and times `train_on_batch`
of both, interleaved (`_tfmot_models.median_step_ms`). Prints one JSON line;
a model tfmot cannot wrap fails with tfmot's own error.

Usage (by bench_speed.py): python benchmarks/_tfmot_speed_worker.py NAME SIZE BATCH STEPS
"""

import json
import os
import sys

if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    sys.exit("_tfmot_speed_worker.py needs TF_USE_LEGACY_KERAS=1 set before it starts.")

import numpy as np
import tensorflow_model_optimization as tfmot
import tf_keras

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _tfmot_models import median_step_ms  # noqa: E402


def main(name, size, batch, steps):
    rng = np.random.default_rng(0)
    x = rng.random((batch, size, size, 3), dtype=np.float32)
    y = rng.integers(0, 10, batch).astype("int32")
    model = getattr(tf_keras.applications, name)(
        input_shape=(size, size, 3), weights=None, classes=10, classifier_activation=None)
    qat = tfmot.quantization.keras.quantize_model(model)
    for m in (model, qat):
        m.compile(tf_keras.optimizers.Adam(1e-4),
                  tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        m.train_on_batch(x, y)  # Traced before timing, as in bench_speed.py.
    step_ms = median_step_ms({"float": model.train_on_batch, "qat": qat.train_on_batch},
                             x, y, steps, warmup=2)
    print(json.dumps({"step_ratio": step_ms["qat"] / step_ms["float"], "step_ms": step_ms}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
