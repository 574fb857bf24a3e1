"""The comparison plot: each candidate's metric against its size, as a PNG."""

import io

from qat_plugin.analysis.metrics import is_fraction, plot_value

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


def plot_png(report, references=None):
    """Returns a PNG (bytes) of a `ComparisonReport`'s metric against size.

    One labelled point per candidate (name and median latency): QAT in
    red, float in gray, PTQ in blue.

    Args:
        report: a `ComparisonReport`.
        references: optional `{label: metric value}` drawn as dashed
            horizontal lines (for example a float model's score).

    Examples:
        >>> from qat_plugin.analysis.plot import plot_png
        >>> from qat_plugin.analysis.report import CandidateResult, ComparisonReport
        >>> row = CandidateResult("float", "float", 0.9, 1.0, 2048, 1024,
        ...     0.1, 0.2, 1.0, False, 1, tflite=b"")
        >>> report = ComparisonReport((row,), "top-1 accuracy", 10, settings={})
        >>> plot_png(report, references={"keras": 0.95})[:4]
        b'\\x89PNG'
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric_name = report.metric_name
    figure = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for r in report.rows:
        color = "tab:red" if r.name.startswith("qat") else (
            "tab:gray" if r.mode == "float" else "tab:blue"
        )
        x, y = r.size_bytes / 1024, plot_value(r.metric, metric_name)
        axes.scatter([x], [y], color=color, s=50, zorder=3)
    for i, (label, value) in enumerate((references or {}).items()):
        axes.axhline(
            plot_value(value, metric_name), linestyle="--",
            color=f"C{2 + i}", linewidth=1, label=label,
        )
    if references:
        axes.legend(loc="lower right", fontsize=8)
    axes.set_xlabel("model size (KB)")
    axes.set_ylabel(
        f"{metric_name} (%)" if is_fraction(metric_name) else metric_name
    )
    axes.set_title(f"{metric_name} against size ({report.num_samples} samples)")
    axes.grid(True, alpha=0.3)
    axes.margins(x=0.15, y=0.3)
    figure.tight_layout()
    # Placed last: label overlap is judged in the final layout.
    _label_points(figure, axes, report.rows, metric_name)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _label_points(figure, axes, rows, metric_name):
    """Annotates each point with its name and latency, avoiding overlaps."""
    renderer = figure.canvas.get_renderer()
    placed = []
    for r in sorted(rows, key=lambda r: r.size_bytes):
        xy = (r.size_bytes / 1024, plot_value(r.metric, metric_name))
        text = f"{r.name}\n{r.latency_ms_median:.3g} ms"
        for place in _LABEL_PLACES:
            label = _annotate(axes, text, xy, place)
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            label.remove()
        else:  # Every place overlaps: the first one, overlapping.
            box = _annotate(axes, text, xy, _LABEL_PLACES[0]).get_window_extent(renderer)
        placed.append(box)


def _annotate(axes, text, xy, place):
    """Writes `text` by the point `xy` at one of `_LABEL_PLACES`."""
    offset, ha, va = place
    return axes.annotate(
        text, xy, textcoords="offset points", xytext=offset, ha=ha, va=va, fontsize=8
    )
