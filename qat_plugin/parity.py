"""`measure_parity`: how closely an int8 export computes its Keras QAT model."""

import dataclasses

import numpy as np

from qat_plugin.interpreter import TFLiteModel


@dataclasses.dataclass(frozen=True)
class Parity:
    """The export's outputs against the Keras QAT model's, on one batch.

    Attributes:
        max_error_steps: the largest |Keras - LiteRT| of each output, in that
            output's quantization steps.
        agreement: per output, the fraction of samples with the same top-1
            class (None for outputs that are not class scores).
        decided_agreement: the same, over the samples whose Keras top-1
            leads the runner-up by more than one output step. Kernels round
            exact ties in their own ways (half up, half away from zero, half
            to even), so a one-step lead is not decided by the model.
        ties: per output, the number of samples left out of
            `decided_agreement`.
        samples: the batch size.
    """

    max_error_steps: tuple
    agreement: tuple
    decided_agreement: tuple
    ties: tuple
    samples: int


def _as_list(outputs):
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def measure_parity(qat_model, tflite_model, x, batch_size=32):
    """Runs `x` through the QAT model and its export and compares them.

    Args:
        qat_model: the quantized Keras model (after `calibrate` or `fit`),
            or a `TFLiteModel` to compare two interpreters (XNNPACK against
            the built-in kernels: how far two correct int8 engines differ).
        tflite_model: its export: bytes, a path or a `TFLiteModel`.
        x: a batch of model inputs (an array, or a list for several inputs).
        batch_size: Keras prediction batch size.

    Returns:
        A `Parity`.

    Example:

    >>> import keras, numpy as np, qat_plugin
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> qat = qat_plugin.quantize_model(model)
    >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    >>> _ = qat_plugin.calibrate(qat, x)
    >>> parity = measure_parity(qat, qat_plugin.export_tflite(qat), x)
    >>> parity.max_error_steps[0] <= 1.0
    True
    """
    runner = (
        tflite_model if isinstance(tflite_model, TFLiteModel)
        else TFLiteModel(tflite_model)
    )
    if isinstance(qat_model, TFLiteModel):
        keras_outputs = _as_list(qat_model.predict(x))
    else:
        keras_outputs = _as_list(
            qat_model.predict(x, batch_size=batch_size, verbose=0)
        )
    tflite_outputs = _as_list(runner.predict(x))
    errors, agreements, decided, ties = [], [], [], []
    for k, t, step in zip(keras_outputs, tflite_outputs, runner.output_steps()):
        k, t = np.asarray(k, "float64"), np.asarray(t, "float64")
        if k.shape != t.shape:
            raise ValueError(
                f"The export's output has shape {t.shape}, the Keras model's "
                f"{k.shape}: the .tflite file is not this model's export."
            )
        errors.append(float(np.abs(k - t).max() / step))
        if k.ndim < 2 or k.shape[-1] < 2:
            agreements.append(None)
            decided.append(None)
            ties.append(0)
            continue
        same = k.argmax(-1) == t.argmax(-1)
        top2 = np.sort(k, axis=-1)[..., -2:]
        # Dequantized values carry float rounding: one step may read 1.00001.
        clear = (top2[..., 1] - top2[..., 0]) / step > 1.0 + 1e-3
        agreements.append(float(same.mean()))
        decided.append(float(same[clear].mean()) if clear.any() else None)
        ties.append(int((~clear).sum()))
    return Parity(
        max_error_steps=tuple(errors),
        agreement=tuple(agreements),
        decided_agreement=tuple(decided),
        ties=tuple(ties),
        samples=int(np.shape(_as_list(x)[0])[0]),
    )
