"""The result of `compare`: one row per candidate, as Markdown, JSON or files."""

import dataclasses
import json
import os

from qat_plugin.analysis import plot
from qat_plugin.analysis.metrics import format_metric
from qat_plugin.files import write_bytes_atomic


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

    Examples:
        >>> from qat_plugin.analysis.report import CandidateResult
        >>> row = CandidateResult(name="ptq-int8", mode="int8", metric=0.9,
        ...     agreement=0.98, size_bytes=4096, gzip_bytes=3000,
        ...     latency_ms_median=0.05, latency_ms_p90=0.07, export_seconds=1.2,
        ...     fully_int8=True, float_ops=0, tflite=b"...")
        >>> row.to_dict()["size_bytes"], "tflite" in row.to_dict()
        (4096, False)
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
        """The row's fields, the model bytes left out."""
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

    Examples:
        >>> import json
        >>> from qat_plugin.analysis.report import CandidateResult, ComparisonReport
        >>> rows = (CandidateResult("float", "float", 0.91, 1.0, 8192, 7000,
        ...     0.1, 0.12, 0.8, False, 2, b""),)
        >>> settings = dict(latency_runs=5, warmup_runs=1, xnnpack=True,
        ...     num_threads=1, machine="x86_64, 2 CPUs")
        >>> report = ComparisonReport(rows, "top-1 accuracy", 64, settings)
        >>> report["float"].size_bytes, json.loads(report.to_json())["num_samples"]
        (8192, 64)
        >>> print(report.to_markdown().splitlines()[2])
        | float | 91.00% | 100.00% | 8.0 | 6.8 | 0.100 | 0.120 | 0.8 | no |
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
        """The report as plain data (the model bytes left out)."""
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
                f"| {r.name} | {format_metric(r.metric, self.metric_name)} | "
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
        return plot.plot_png(self, references)

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
