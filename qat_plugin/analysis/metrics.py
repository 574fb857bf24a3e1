"""Scores and timings of one exported model: accuracy, agreement, latency.

`top1_accuracy` is the default metric of `compare`, `metric_function`
resolves the `metric=` argument, `agreement` compares top-1 classes with
the float model and `measure_latency` times single-sample invokes. The
formatting helpers (`format_metric`, `plot_value`, `is_fraction`) show a
metric the same way in the report's table and in its plot; `as_list`
takes a model's outputs (one array or several) as a list before scoring.
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


def top1_accuracy(y_true, y_pred):
    """Top-1 accuracy of class scores `y_pred` against labels or one-hot `y_true`.

    A single output unit is read as a probability thresholded at 0.5.

    Examples:
        >>> import numpy as np
        >>> from qat_plugin.analysis.metrics import top1_accuracy
        >>> top1_accuracy(np.array([1, 0]), np.array([[0.2, 0.8], [0.3, 0.7]]))
        0.5
    """
    y_pred = np.asarray(y_pred)
    y_true = np.asarray(y_true)
    if y_pred.ndim < 2:
        raise ValueError(
            f"Top-1 accuracy needs class scores (a last axis of classes), got "
            f"predictions of shape {y_pred.shape}; pass metric=... to compare."
        )
    if y_pred.shape[-1] == 1:  # one probability: binary accuracy at 0.5
        predicted = (y_pred[..., 0] > 0.5).astype("int64")
        return float(np.mean(predicted == y_true.reshape(predicted.shape)))
    if y_true.ndim == y_pred.ndim and y_true.shape[-1] == y_pred.shape[-1]:
        y_true = y_true.argmax(-1)
    y_true = y_true.reshape(y_pred.shape[:-1])
    return float(np.mean(y_pred.argmax(-1) == y_true))


def metric_function(metric):
    """Returns `(name, score(y_true, y_pred) -> float)` for `compare`'s `metric=`.

    Examples:
        >>> import numpy as np
        >>> from qat_plugin.analysis.metrics import metric_function
        >>> name, score = metric_function(None)
        >>> name, score(np.array([1]), np.array([[0.1, 0.9]]))
        ('top-1 accuracy', 1.0)
    """
    if metric is None:
        return "top-1 accuracy", top1_accuracy
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


def agreement(reference, y_pred):
    """The fraction of samples whose top-1 class is the reference's (None without classes).

    Examples:
        >>> import numpy as np
        >>> from qat_plugin.analysis.metrics import agreement
        >>> agreement(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([[0.2, 0.8], [0.3, 0.7]]))
        0.5
    """
    if reference.ndim < 2 or reference.shape[-1] < 2:
        return None
    return float(np.mean(reference.argmax(-1) == np.asarray(y_pred).argmax(-1)))


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
