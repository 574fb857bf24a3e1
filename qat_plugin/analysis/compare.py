"""`compare`: QAT against post-training quantization, measured in LiteRT."""

import gzip
import os
import platform
import time

import keras
import numpy as np

from qat_plugin.analysis.metrics import (
    agreement,
    as_list,
    binary_threshold,
    check_labels,
    measure_latency,
    metric_function,
    output_is_logits,
    top1_accuracy,
)
from qat_plugin.analysis.report import CandidateResult, ComparisonReport
from qat_plugin.data.batches import labelled_arrays, model_call_inputs
from qat_plugin.layers.base import is_quantized
from qat_plugin.config.constants import CALIBRATED_MODES, MODES
from qat_plugin.tflite.convert import export_tflite
from qat_plugin.tflite.input_shapes import export_input_specs
from qat_plugin.tflite.inspection import inspect_tflite
from qat_plugin.tflite.interpreter import TFLiteModel

__all__ = ["DEFAULT_MODES", "compare", "measure_latency"]

DEFAULT_MODES = ("float", "dynamic", "float16", "int8")
# Evaluation longer than this (estimated after the first batch) shows a
# progress bar.
_PROGRESS_AFTER_SECONDS = 3.0


def _predict(runner, inputs, batch_size, verbose, label):
    """Runs all samples through `runner` in batches, with a progress bar if slow."""
    count = len(inputs[0])
    outputs, bar, start = [], None, time.perf_counter()
    for begin in range(0, count, batch_size):
        chunk = [a[begin : begin + batch_size] for a in inputs]
        outputs.append(as_list(runner.predict(chunk, batch_size=batch_size))[0])
        done = begin + len(chunk[0])
        if bar is None and verbose and done < count:
            estimate = (time.perf_counter() - start) * count / done
            if verbose == 1 or estimate > _PROGRESS_AFTER_SECONDS:
                print(f"Evaluating {label}")
                bar = keras.utils.Progbar(count, unit_name="sample")
        if bar is not None:
            bar.update(done)
    return np.concatenate(outputs)


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


def _check_counts(**counts):
    """Raises `ValueError` for a count below its least value (1, or the one given)."""
    for name, value in counts.items():
        value, least = value if isinstance(value, tuple) else (value, 1)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{name} must be a whole number of {least} or more, got {value!r}.")


def compare(
    float_model,
    qat_model=None,
    *,
    eval_data,
    representative_data=None,
    modes=DEFAULT_MODES,
    metric=None,
    from_logits=None,
    num_threads=1,
    warmup_runs=10,
    latency_runs=100,
    batch_size=256,
    calibration_steps=200,
    verbose="auto",
    input_shape=None,
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
        modes: PTQ modes of the float model (see `qat_plugin.config.constants.MODES`).
        metric: None (top-1 accuracy), a `keras.metrics.Metric` or a
            `callable(y_true, y_pred) -> float`; it sees the first output.
            Top-1 accuracy needs numeric labels, one per sample: class
            indices, or one-hot rows as wide as the output.
        from_logits: for top-1 accuracy of a one-unit (binary) output:
            True when it outputs logits (a sample is class 1 above 0),
            False for probabilities (above 0.5). None reads it from the
            float model's final activation: linear (none) is logits,
            sigmoid probabilities; any other asks for `from_logits`. The
            same threshold applies to every candidate's (dequantized)
            outputs and to their agreement with the float model.
        num_threads: interpreter threads, for evaluation and latency.
        warmup_runs: interpreter invokes before timing starts.
        latency_runs: timed invokes (the median and 90th percentile are reported).
        batch_size: samples per interpreter invoke during evaluation.
        calibration_steps: calibration samples for the PTQ int modes.
        verbose: `"auto"` (progress bar for long evaluations), 0 or 1.
        input_shape: the fixed shape of inputs of undefined size (token ids
            `(None,)`, images `(None, None, 3)`) for every candidate, as in
            `export_tflite`; `eval_data` must have that shape.

    Returns:
        A `ComparisonReport`: `str(report)` is a Markdown table,
        `report.to_json()`, `report.save_plot(path)`, `report.save(dir)`.

    Examples:
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
    export_input_specs(float_model, input_shape)  # Fails before any data is read.
    _check_counts(latency_runs=latency_runs, batch_size=batch_size,
                  warmup_runs=(warmup_runs, 0),
                  **({} if num_threads is None else {"num_threads": num_threads}))
    metric_function(metric)  # A bad metric= fails before the data is read.
    if from_logits not in (None, True, False):
        raise ValueError(f"from_logits must be None, True or False, got {from_logits!r}.")
    inputs, targets = labelled_arrays(float_model, eval_data)
    reference = as_list(
        float_model.predict(
            model_call_inputs(float_model, inputs), batch_size=batch_size, verbose=0
        )
    )[0]
    if metric is None and reference.ndim < 2:
        top1_accuracy(targets, reference)  # Says to pass metric=.
    check_labels(targets, reference, "eval_data (its labels)", classes=metric is None)
    threshold = None
    if metric is None and reference.ndim >= 2 and reference.shape[-1] == 1:
        if from_logits is None:
            from_logits = output_is_logits(float_model)
        threshold = binary_threshold(from_logits)
    metric_name, score = metric_function(metric, from_logits=bool(from_logits))

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
            data = export_tflite(model, input_shape=input_shape)
        else:
            data = export_tflite(
                model,
                input_shape=input_shape,
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
                agreement=agreement(reference, y_pred, threshold),
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
