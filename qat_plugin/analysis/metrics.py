"""Scores and timings of one exported model: accuracy, agreement, latency.

`top1_accuracy` is the default metric of `compare`, `metric_function`
resolves the `metric=` argument, `agreement` compares top-1 classes with
the float model and `measure_latency` times single-sample invokes. The
formatting helpers (`format_metric`, `plot_value`, `is_fraction`) show a
metric the same way in the report's table and in its plot; `as_list`
takes a model's outputs (one array or several) as a list before scoring.
`check_labels` refuses labels that cannot be scored (strings, the wrong
count, one-hot rows of another width) before any export, and
`output_is_logits` reads whether a one-unit classifier outputs logits
(threshold 0) or probabilities (threshold 0.5) from its final activation.
"""

import time

import keras
import numpy as np


def as_list(values):
    """Returns one output (or input), a list, tuple or dict of them as a list.

    A dict is flattened as Keras flattens it (sorted keys), which is the
    order of an exported file's outputs.

    Examples:
        >>> import numpy as np
        >>> from qat_plugin.analysis.metrics import as_list
        >>> len(as_list(np.zeros(3))), len(as_list((np.zeros(3), np.ones(2))))
        (1, 2)
        >>> [a.shape for a in as_list({"score": np.zeros(1), "logits": np.zeros(2)})]
        [(2,), (1,)]
    """
    if isinstance(values, dict):
        return keras.tree.flatten(values)
    return list(values) if isinstance(values, (list, tuple)) else [values]


def is_fraction(metric_name):
    """Whether the metric is a fraction shown as a percentage.

    Examples:
        >>> from qat_plugin.analysis.metrics import is_fraction
        >>> is_fraction("top-1 accuracy"), is_fraction("mse")
        (True, False)
    """
    return metric_name in ("top-1 accuracy",)


def format_metric(value, metric_name):
    """Formats a metric value for the report's table.

    Examples:
        >>> from qat_plugin.analysis.metrics import format_metric
        >>> format_metric(0.98765, "top-1 accuracy"), format_metric(0.012345, "mse")
        ('98.77%', '0.01235')
    """
    return f"{100 * value:.2f}%" if is_fraction(metric_name) else f"{value:.4g}"


def plot_value(value, metric_name):
    """The metric value as drawn on the plot's vertical axis.

    Examples:
        >>> from qat_plugin.analysis.metrics import plot_value
        >>> plot_value(0.5, "top-1 accuracy"), plot_value(0.5, "mse")
        (50.0, 0.5)
    """
    return 100 * value if is_fraction(metric_name) else value


# Final activations of a one-unit classifier, by the space they output in.
PROBABILITY_ACTIVATIONS = ("sigmoid", "hard_sigmoid")
LOGIT_ACTIVATIONS = ("linear",)


def binary_threshold(from_logits):
    """The decision threshold of a one-unit classifier: 0 for logits, 0.5 for probabilities.

    Examples:
        >>> from qat_plugin.analysis.metrics import binary_threshold
        >>> binary_threshold(True), binary_threshold(False)
        (0.0, 0.5)
    """
    return 0.0 if from_logits else 0.5


def output_is_logits(model):
    """Whether `model`'s first output is logits (True) or probabilities (False).

    Read from the final activation of the layer that produces the output: a
    linear one (no activation) outputs logits, a sigmoid probabilities.
    Any other layer or activation is a `ValueError` asking for
    `from_logits=` (one-unit outputs are thresholded at 0 for logits and at
    0.5 for probabilities).

    Examples:
        >>> import keras
        >>> from qat_plugin.analysis.metrics import output_is_logits
        >>> logits = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        >>> probabilities = keras.Sequential(
        ...     [keras.Input((3,)), keras.layers.Dense(1, activation="sigmoid")])
        >>> output_is_logits(logits), output_is_logits(probabilities)
        (True, False)
    """
    output = as_list(model.outputs)[0]
    history = getattr(output, "_keras_history", None)
    layer = history[0] if history else model.layers[-1]
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", None) if activation is not None else None
    if name in LOGIT_ACTIVATIONS:
        return True
    if name in PROBABILITY_ACTIVATIONS:
        return False
    found = f"activation '{name}'" if name else f"a {type(layer).__name__} (no activation)"
    raise ValueError(
        f"The output of model '{model.name}' comes from layer '{layer.name}' with "
        f"{found}, so it is unclear whether its one unit holds logits or "
        "probabilities: pass from_logits=True (threshold 0) or "
        "from_logits=False (threshold 0.5)."
    )


def check_labels(y_true, y_pred, argument="y_true", classes=True):
    """Checks labels against predictions before scoring; returns them as class indices.

    Labels must be numbers (or booleans), one per sample. With `classes`
    (for top-1 accuracy) they must be class indices `0 .. width - 1` (0 or 1
    for a one-unit output) or one-hot rows as wide as the predictions; the
    class indices are returned, of the predictions' shape without the last
    axis. Without `classes` only the dtype and the count are checked and
    the labels come back as given. Every error names `argument`.

    Examples:
        >>> import numpy as np
        >>> from qat_plugin.analysis.metrics import check_labels
        >>> check_labels(np.eye(3)[[2, 0]], np.zeros((2, 3))).tolist()
        [2, 0]
        >>> check_labels(np.array(["cat", "dog"]), np.zeros((2, 3)), "eval_data")
        Traceback (most recent call last):
        ...
        ValueError: eval_data: labels of dtype <U3 (e.g. 'cat') cannot be scored; ...
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.dtype.kind not in "biuf":
        example = y_true.reshape(-1)[0].item() if y_true.size else None
        raise ValueError(
            f"{argument}: labels of dtype {y_true.dtype} (e.g. {example!r}) cannot "
            "be scored; give class indices (integers) or one-hot rows, e.g. "
            "np.unique(y, return_inverse=True)[1] for class names."
        )
    if y_true.dtype.kind == "b":
        y_true = y_true.astype("int64")
    if y_true.ndim == 0 or len(y_true) != len(y_pred):
        count = "a single label" if y_true.ndim == 0 else f"{len(y_true)} labels"
        raise ValueError(
            f"{argument}: {count} for {len(y_pred)} samples; give one label per sample."
        )
    if not classes:
        return y_true
    width = y_pred.shape[-1]
    if y_true.ndim == y_pred.ndim and y_true.shape[-1] != 1:
        if y_true.shape[-1] != width or width == 1:
            raise ValueError(
                f"{argument}: one-hot labels {y_true.shape[-1]} wide, but the "
                f"model outputs {width} class score(s) per sample: give one-hot "
                f"rows {width} wide or class indices"
                + (" (0 or 1)." if width == 1 else ".")
            )
        y_true = y_true.argmax(-1)
    elif y_true.ndim == y_pred.ndim:
        y_true = y_true[..., 0]
    if y_true.shape != y_pred.shape[:-1]:
        raise ValueError(
            f"{argument}: labels of shape {y_true.shape} do not fit predictions "
            f"of shape {y_pred.shape}; give one class index per prediction."
        )
    top = max(width, 2) - 1
    wrong = (y_true < 0) | (y_true > top) | (y_true != np.round(y_true))
    if wrong.any():
        raise ValueError(
            f"{argument}: class labels must be whole numbers from 0 to {top} for "
            f"{width} output unit(s), got {y_true[wrong].reshape(-1)[0].item()!r}."
        )
    return y_true.astype("int64")


def top1_accuracy(y_true, y_pred, from_logits=False):
    """Top-1 accuracy of class scores `y_pred` against labels or one-hot `y_true`.

    A single output unit is a binary classifier: its value is a logit
    thresholded at 0 with `from_logits=True`, a probability thresholded at
    0.5 otherwise (`compare` decides from the model's final activation).
    Labels are checked first (`check_labels`).

    Examples:
        >>> import numpy as np
        >>> from qat_plugin.analysis.metrics import top1_accuracy
        >>> top1_accuracy(np.array([1, 0]), np.array([[0.2, 0.8], [0.3, 0.7]]))
        0.5
        >>> logits = np.array([[0.3], [-2.0]])
        >>> top1_accuracy([1, 0], logits, from_logits=True), top1_accuracy([1, 0], logits)
        (1.0, 0.5)
    """
    y_pred = np.asarray(y_pred)
    if y_pred.ndim < 2:
        raise ValueError(
            f"Top-1 accuracy needs class scores (a last axis of classes), got "
            f"predictions of shape {y_pred.shape}; pass metric=... to compare."
        )
    y_true = check_labels(y_true, y_pred)
    if y_pred.shape[-1] == 1:  # one unit: a binary classifier
        predicted = (y_pred[..., 0] > binary_threshold(from_logits)).astype("int64")
    else:
        predicted = y_pred.argmax(-1)
    return float(np.mean(predicted == y_true))


def metric_function(metric, from_logits=False):
    """Returns `(name, score(y_true, y_pred) -> float)` for `compare`'s `metric=`.

    `from_logits` applies to the default top-1 accuracy of a one-unit
    output (see `top1_accuracy`); a given metric sees the outputs as they are.

    Examples:
        >>> import numpy as np
        >>> from qat_plugin.analysis.metrics import metric_function
        >>> name, score = metric_function(None)
        >>> name, score(np.array([1]), np.array([[0.1, 0.9]]))
        ('top-1 accuracy', 1.0)
    """
    if metric is None:
        return "top-1 accuracy", lambda t, p: top1_accuracy(t, p, from_logits)
    if isinstance(metric, keras.metrics.Metric):

        def score(y_true, y_pred):
            metric.reset_state()
            metric.update_state(y_true, y_pred)
            return float(keras.ops.convert_to_numpy(metric.result()))

        return metric.name, score
    if callable(metric):
        return getattr(metric, "__name__", "metric"), lambda t, p: float(metric(t, p))
    raise TypeError(
        "metric must be None (top-1 accuracy), a keras.metrics.Metric or a "
        f"callable(y_true, y_pred) -> float; got {type(metric).__name__}."
    )


def agreement(reference, y_pred, threshold=None):
    """The fraction of samples whose top-1 class is the reference's (None without classes).

    A one-unit output is compared by its decision at `threshold` (see
    `binary_threshold`); without a threshold it has no classes.

    Examples:
        >>> import numpy as np
        >>> from qat_plugin.analysis.metrics import agreement
        >>> agreement(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([[0.2, 0.8], [0.3, 0.7]]))
        0.5
        >>> agreement(np.array([[2.0], [-1.0]]), np.array([[0.5], [0.1]]), threshold=0.0)
        0.5
    """
    y_pred = np.asarray(y_pred)
    if reference.ndim < 2:
        return None
    if reference.shape[-1] == 1:
        if threshold is None:
            return None
        return float(np.mean((reference > threshold) == (y_pred > threshold)))
    return float(np.mean(reference.argmax(-1) == y_pred.argmax(-1)))


def measure_latency(runner, inputs, warmup_runs, runs):
    """Median and 90th percentile of `invoke()` on one sample, in ms.

    One sample is set once (the input resized to batch 1); only
    `interpreter.invoke()` is timed.

    Examples:
        >>> import keras, numpy as np, qat_plugin
        >>> from qat_plugin.analysis.metrics import measure_latency
        >>> from qat_plugin.tflite.interpreter import TFLiteModel
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> runner = TFLiteModel(qat_plugin.export_tflite(model, mode="float"))
        >>> median, p90 = measure_latency(runner, [np.ones((3, 4), "float32")], 1, 5)
        >>> 0 <= median <= p90
        True
    """
    runner.predict([a[:1] for a in inputs])
    for _ in range(warmup_runs):
        runner.interpreter.invoke()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner.interpreter.invoke()
        times.append(time.perf_counter() - start)
    times = 1000 * np.array(times)
    return float(np.median(times)), float(np.percentile(times, 90))
