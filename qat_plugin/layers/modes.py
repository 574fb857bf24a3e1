"""The thread's mode flags that change what quantized layers trace.

Export traces constants (`export_mode`), calibration observes in inference
mode (`calibration_mode`), and `activation_probe` records what each
activation fake-quant sees.
"""

import contextlib
import threading

_mode = threading.local()


@contextlib.contextmanager
def _mode_flag(name):
    """Sets the thread's mode flag `name` while the context is open."""
    previous = getattr(_mode, name, False)
    setattr(_mode, name, True)
    try:
        yield
    finally:
        setattr(_mode, name, previous)


def export_mode():
    """Traces quantized layers with their int weights baked in as constants.

    Inside this context each quantized layer uses the kernels computed by
    `export_constants()` (folded, snapped to the int grid, as NumPy arrays)
    instead of computing them from its variables. The TFLite converter then
    sees float constants that are exactly on the per-channel int8 grid, and
    writes them with exactly those scales; this also sidesteps the
    converter's failure on per-channel fake-quant of FULLY_CONNECTED weights.
    """
    return _mode_flag("exporting")


def calibration_mode():
    """Runs quantized layers in inference mode while their observers update.

    Used by `qat_plugin.calibrate`: BatchNormalization statistics and the
    schedule stay as they are, activation ranges learn from the data.
    """
    return _mode_flag("calibrating")


@contextlib.contextmanager
def activation_probe():
    """Records what each activation fake-quant sees while the context is open.

    Yields a list that receives, for every fake-quant run eagerly inside the
    context, a tuple `(layer, quantizer, inputs, range_min, range_max)`: the
    tensor before fake-quant and the range it is quantized to. Used by
    `QuantizationMonitor` to measure how much of each activation is clipped.

    Examples:
        >>> import numpy as np
        >>> from qat_plugin.layers import FakeQuant
        >>> layer = FakeQuant()
        >>> _ = layer(np.array([[0.0, 1.0]], "float32"), training=True)
        >>> with activation_probe() as records:
        ...     _ = layer(np.array([[2.0]], "float32"))
        >>> [float(records[0][2][0, 0]), float(records[0][4])]
        [2.0, 1.0]
    """
    previous = current_probe()
    records = []
    _mode.probe = records
    try:
        yield records
    finally:
        _mode.probe = previous


def is_exporting():
    return getattr(_mode, "exporting", False)


def is_calibrating():
    return getattr(_mode, "calibrating", False)


def current_probe():
    """The list `activation_probe` records into, or None outside it."""
    return getattr(_mode, "probe", None)
