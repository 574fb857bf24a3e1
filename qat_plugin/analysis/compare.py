"""`compare`: QAT against post-training quantization, measured in LiteRT."""

import dataclasses
import gzip
import io
import json
import os
import platform
import time

import keras
import numpy as np

from qat_plugin.data.batches import labelled_arrays, model_call_inputs
from qat_plugin.layers.base import is_quantized
from qat_plugin.tflite.convert import CALIBRATED_MODES, MODES, export_tflite
from qat_plugin.files import write_bytes_atomic
from qat_plugin.tflite.inspection import inspect_tflite
from qat_plugin.tflite.interpreter import TFLiteModel

DEFAULT_MODES = ("float", "dynamic", "float16", "int8")
# Evaluation longer than this (estimated after the first batch) shows a
# progress bar.
_PROGRESS_AFTER_SECONDS = 3.0


@dataclasses.dataclass(frozen=True)
class CandidateResult:
    """One exported model, measured.

    Attributes:
        name: `"float"`, `"ptq-<mode>"` or `"qat-int8"` (`"qat-int16x8"`).
        mode: the export mode.
        metric: the score on the evaluation data (top-1 accuracy by
            default).
        agreement: fraction of samples whose top-1 class equals the float
            Keras model's (None when the output has no class axis).
        size_bytes, gzip_bytes: the .tflite size, raw and gzip-compressed
            (level 9).
        latency_ms_median, latency_ms_p90: single-sample `invoke()` time.
        export_seconds: conversion wall time.
        fully_int8: `inspect_tflite(...).is_fully_int8`.
        float_ops: how many ops still compute in float.
        tflite: the model bytes (not part of the JSON).
    """

    name: str
    mode: str
    metric: float
    agreement: float
    size_bytes: int
    gzip_bytes: int
    latency_ms_median: float
    latency_ms_p90: float
    export_seconds: float
    fully_int8: bool
    float_ops: int
    tflite: bytes = dataclasses.field(repr=False)

    def to_dict(self):
        row = dataclasses.asdict(self)
        del row["tflite"]
        return row


@dataclasses.dataclass(frozen=True)
class ComparisonReport:
    """The result of `compare`: one `CandidateResult` per candidate.

    Attributes:
        rows: the candidates, in the order measured.
        metric_name: what `CandidateResult.metric` is.
        num_samples: evaluation samples.
        settings: how latency was measured (threads, XNNPACK, runs) and the
            software versions.
    """

    rows: tuple
    metric_name: str
    num_samples: int
    settings: dict

    def __getitem__(self, name):
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(
            f"No candidate '{name}'; candidates: {[r.name for r in self.rows]}."
        )

    def to_dict(self):
        return {
            "metric": self.metric_name,
            "num_samples": self.num_samples,
            "settings": self.settings,
            "candidates": [row.to_dict() for row in self.rows],
        }

    def to_json(self):
        """The report as a JSON string (the model bytes left out)."""
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self):
        """The report as a Markdown table with a line on how it was measured."""
        header = (
            f"| candidate | {self.metric_name} | agreement with float | size (KB) "
            "| gzip (KB) | latency median (ms) | latency p90 (ms) | "
            "export (s) | fully int8 |"
        )
        lines = [header, "|" + "---|" * 9]
        for r in self.rows:
            agreement = "n/a" if r.agreement is None else f"{100 * r.agreement:.2f}%"
            lines.append(
                f"| {r.name} | {_format_metric(r.metric, self.metric_name)} | "
                f"{agreement} | {r.size_bytes / 1024:.1f} | "
                f"{r.gzip_bytes / 1024:.1f} | {r.latency_ms_median:.3f} | "
                f"{r.latency_ms_p90:.3f} | {r.export_seconds:.1f} | "
                f"{'yes' if r.fully_int8 else 'no'} |"
            )
        s = self.settings
        lines.append("")
        lines.append(
            f"{self.num_samples} evaluation samples in the LiteRT interpreter; "
            "agreement: same top-1 class as the float Keras model. "
            f"Latency: {s['latency_runs']} single-sample invokes after "
            f"{s['warmup_runs']} warm-up, XNNPACK {'on' if s['xnnpack'] else 'off'}, "
            f"{s['num_threads']} thread(s), {s['machine']}."
        )
        return "\n".join(lines)

    def __str__(self):
        return self.to_markdown()

    def plot_png(self, references=None):
        """Returns a PNG (bytes) of the metric against size, one labelled point per candidate.

        Args:
            references: optional `{label: metric value}` drawn as dashed
                horizontal lines (for example a float model's score).
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6.4, 4.2), dpi=120)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for r in self.rows:
            color = "tab:red" if r.name.startswith("qat") else (
                "tab:gray" if r.mode == "float" else "tab:blue"
            )
            x, y = r.size_bytes / 1024, _plot_value(r.metric, self.metric_name)
            axes.scatter([x], [y], color=color, s=50, zorder=3)
        for i, (label, value) in enumerate((references or {}).items()):
            axes.axhline(
                _plot_value(value, self.metric_name), linestyle="--",
                color=f"C{2 + i}", linewidth=1, label=label,
            )
        if references:
            axes.legend(loc="lower right", fontsize=8)
        axes.set_xlabel("model size (KB)")
        axes.set_ylabel(
            f"{self.metric_name} (%)" if _is_fraction(self.metric_name) else self.metric_name
        )
        axes.set_title(f"{self.metric_name} against size ({self.num_samples} samples)")
        axes.grid(True, alpha=0.3)
        axes.margins(x=0.15, y=0.3)
        figure.tight_layout()
        # Placed last: label overlap is judged in the final layout.
        _label_points(figure, axes, self.rows, self.metric_name)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return buffer.getvalue()

    def save_plot(self, path, references=None):
        """Writes `plot_png(references)` to `path` atomically."""
        write_bytes_atomic(path, self.plot_png(references))

    def save(self, directory, models=True, references=None):
        """Writes comparison.md, comparison.json, comparison.png (and the models).

        Returns:
            A dict of the written paths.
        """
        os.makedirs(directory, exist_ok=True)
        paths = {
            "markdown": os.path.join(directory, "comparison.md"),
            "json": os.path.join(directory, "comparison.json"),
            "plot": os.path.join(directory, "comparison.png"),
        }
        write_bytes_atomic(paths["markdown"], (self.to_markdown() + "\n").encode())
        write_bytes_atomic(paths["json"], (self.to_json() + "\n").encode())
        self.save_plot(paths["plot"], references)
        if models:
            for r in self.rows:
                path = os.path.join(directory, f"{r.name}.tflite")
                write_bytes_atomic(path, r.tflite)
                paths[r.name] = path
        return paths


# Label positions tried in turn (offsets in points, alignment), the first
# that overlaps no label already placed wins.
_LABEL_PLACES = (
    ((0, 8), "center", "bottom"),
    ((0, -8), "center", "top"),
    ((8, 0), "left", "center"),
    ((-8, 0), "right", "center"),
    ((0, 30), "center", "bottom"),
    ((0, -30), "center", "top"),
)


def _label_points(figure, axes, rows, metric_name):
    """Annotates each point with its name and latency, avoiding overlaps."""
    renderer = figure.canvas.get_renderer()
    placed = []
    for r in sorted(rows, key=lambda r: r.size_bytes):
        xy = (r.size_bytes / 1024, _plot_value(r.metric, metric_name))
        for offset, ha, va in _LABEL_PLACES:
            label = axes.annotate(
                f"{r.name}\n{r.latency_ms_median:.3g} ms", xy,
                textcoords="offset points", xytext=offset, ha=ha, va=va, fontsize=8,
            )
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            label.remove()
        else:
            label = axes.annotate(
                f"{r.name}\n{r.latency_ms_median:.3g} ms", xy, textcoords="offset points",
                xytext=_LABEL_PLACES[0][0], ha="center", va="bottom", fontsize=8,
            )
            box = label.get_window_extent(renderer)
        placed.append(box)


def _is_fraction(metric_name):
    return metric_name in ("top-1 accuracy",)


def _format_metric(value, metric_name):
    return f"{100 * value:.2f}%" if _is_fraction(metric_name) else f"{value:.4g}"


def _plot_value(value, metric_name):
    return 100 * value if _is_fraction(metric_name) else value


def top1_accuracy(y_true, y_pred):
    """Top-1 accuracy of class scores `y_pred` against labels or one-hot `y_true`.

    A single output unit is read as a probability thresholded at 0.5.

    Example:

    >>> import numpy as np
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


def _metric_function(metric):
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


def _first_output(outputs):
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


def _agreement(reference, y_pred):
    if reference.ndim < 2 or reference.shape[-1] < 2:
        return None
    return float(np.mean(reference.argmax(-1) == np.asarray(y_pred).argmax(-1)))


def _predict(runner, inputs, batch_size, verbose, label):
    """Runs all samples through `runner` in batches, with a progress bar if slow."""
    count = len(inputs[0])
    outputs, bar, start = [], None, time.perf_counter()
    for begin in range(0, count, batch_size):
        chunk = [a[begin : begin + batch_size] for a in inputs]
        outputs.append(_first_output(runner.predict(chunk, batch_size=batch_size)))
        done = begin + len(chunk[0])
        if bar is None and verbose and done < count:
            estimate = (time.perf_counter() - start) * count / done
            if verbose == 1 or estimate > _PROGRESS_AFTER_SECONDS:
                print(f"Evaluating {label}")
                bar = keras.utils.Progbar(count, unit_name="sample")
        if bar is not None:
            bar.update(done)
    return np.concatenate(outputs)


def measure_latency(runner, inputs, warmup_runs, runs):
    """Median and 90th percentile of `invoke()` on one sample, in ms.

    One sample is set once (the input resized to batch 1); only
    `interpreter.invoke()` is timed.
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


def _settings(num_threads, warmup_runs, latency_runs):
    import tensorflow as tf

    try:
        from importlib.metadata import version

        litert = version("ai-edge-litert")
    except Exception:  # Not installed as a distribution: version unknown.
        litert = "unknown"
    return {
        "num_threads": num_threads,
        "xnnpack": True,
        "warmup_runs": warmup_runs,
        "latency_runs": latency_runs,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "ai_edge_litert": litert,
    }


def compare(
    float_model,
    qat_model=None,
    *,
    eval_data,
    representative_data=None,
    modes=DEFAULT_MODES,
    metric=None,
    num_threads=1,
    warmup_runs=10,
    latency_runs=100,
    batch_size=256,
    calibration_steps=200,
    verbose="auto",
):
    """Exports QAT and PTQ candidates and measures each in the LiteRT interpreter.

    Every candidate is exported with `export_tflite` (the float model in each
    of `modes`, plus the QAT model when given) and evaluated on `eval_data`
    in the interpreter, in batches of `batch_size` (the input tensor is
    resized) with a progress bar when that takes more than a few seconds.
    Latency is the median and 90th percentile of single-sample `invoke()`
    calls after warm-up, with the default XNNPACK delegate and `num_threads`
    threads; measure on an idle machine for numbers worth quoting.

    Args:
        float_model: the trained float Keras model (the reference).
        qat_model: a model from `quantize_model`, trained; optional.
        eval_data: `(x, y)` arrays, or a `tf.data.Dataset`, `PyDataset` or
            generator of `(x, y)` batches. Read once, kept in memory.
        representative_data: calibration inputs for the `"int8"` and
            `"int16x8"` modes (see `export_tflite`); take them from the
            training data, not from `eval_data`.
        modes: PTQ modes of the float model (see `qat_plugin.export.MODES`).
        metric: None (top-1 accuracy), a `keras.metrics.Metric` or a
            `callable(y_true, y_pred) -> float`; it sees the first output.
        num_threads: interpreter threads, for evaluation and latency.
        warmup_runs, latency_runs: invokes before and during timing.
        batch_size: samples per interpreter invoke during evaluation.
        calibration_steps: calibration samples for the PTQ int modes.
        verbose: `"auto"` (progress bar for long evaluations), 0 or 1.

    Returns:
        A `ComparisonReport`: `str(report)` is a Markdown table,
        `report.to_json()`, `report.save_plot(path)`, `report.save(dir)`.

    Example:

    >>> import keras, numpy as np, qat_plugin
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> x, y = np.random.rand(64, 4).astype("float32"), np.arange(64) % 3
    >>> report = qat_plugin.analysis.compare(model, eval_data=(x, y),
    ...     representative_data=x, modes=("float", "int8"), latency_runs=5)
    >>> [row.name for row in report.rows]
    ['float', 'ptq-int8']
    """
    modes = tuple(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"modes: unknown {unknown}; choose from {MODES}.")
    if is_quantized(float_model):
        raise ValueError(
            f"float_model '{float_model.name}' is a QAT model; pass the float "
            "model first and the QAT model as qat_model."
        )
    if qat_model is not None and not is_quantized(qat_model):
        raise ValueError(
            f"qat_model '{qat_model.name}' was not built by quantize_model."
        )
    if representative_data is None and any(m in CALIBRATED_MODES for m in modes):
        raise ValueError(
            f"modes {[m for m in modes if m in CALIBRATED_MODES]} calibrate "
            "activation ranges: pass representative_data (training inputs)."
        )
    if not modes and qat_model is None:
        raise ValueError("Nothing to compare: give modes or a qat_model.")
    metric_name, score = _metric_function(metric)
    inputs, targets = labelled_arrays(float_model, eval_data)
    reference = _first_output(
        float_model.predict(
            model_call_inputs(float_model, inputs), batch_size=batch_size, verbose=0
        )
    )

    candidates = [
        ("float" if m == "float" else f"ptq-{m}", m, float_model) for m in modes
    ]
    if qat_model is not None:
        bits16 = any(getattr(l, "num_bits", 8) == 16 for l in qat_model.layers)
        mode = "int16x8" if bits16 else "int8"
        candidates.append((f"qat-{mode}", mode, qat_model))

    rows = []
    for name, mode, model in candidates:
        start = time.perf_counter()
        if model is qat_model:
            data = export_tflite(model)
        else:
            data = export_tflite(
                model,
                mode=mode,
                representative_data=representative_data,
                calibration_steps=calibration_steps,
            )
        export_seconds = time.perf_counter() - start
        runner = TFLiteModel(data, num_threads=num_threads)
        y_pred = _predict(runner, inputs, batch_size, verbose, name)
        median, p90 = measure_latency(runner, inputs, warmup_runs, latency_runs)
        report = inspect_tflite(data)
        rows.append(
            CandidateResult(
                name=name,
                mode=mode,
                metric=score(targets, y_pred),
                agreement=_agreement(reference, y_pred),
                size_bytes=len(data),
                gzip_bytes=len(gzip.compress(data, compresslevel=9)),
                latency_ms_median=median,
                latency_ms_p90=p90,
                export_seconds=export_seconds,
                fully_int8=report.is_fully_int8,
                float_ops=len(report.float_ops),
                tflite=data,
            )
        )
    return ComparisonReport(
        rows=tuple(rows),
        metric_name=metric_name,
        num_samples=len(targets),
        settings=_settings(num_threads, warmup_runs, latency_runs),
    )
