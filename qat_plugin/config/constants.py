"""Names and values shared by the engine, the recipes and the export."""

# The step at which a schedule switch never happens (int32 max: the switches
# are int32 variables compared in-graph).
NEVER = 2**31 - 1
# How a recipe file or a callback argument spells "never".
NEVER_KEYWORD = "never"

# Units a schedule point is counted in.
UNITS = ("step", "epoch")
# The `QuantizationScheduler` points, in the order of a layer's schedule.
SCHEDULE_POINTS = ("quantize_start", "bn_freeze", "range_freeze")

# Deployment targets `export_tflite` and `inspect_tflite` check.
TARGETS = ("cpu", "gpu", "mcu")

# Activations TFLite fuses into CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED,
# ADD, SUB and MUL: no fake-quant between the op and the activation.
FUSED_ACTIVATIONS = ("linear", "relu", "relu6")

# `export_tflite` modes of a float model (post-training quantization).
MODES = ("float", "dynamic", "float16", "int8", "int16x8")
# The PTQ modes whose activation ranges come from calibration data.
CALIBRATED_MODES = ("int8", "int16x8")

# Unstructured (magnitude) pruning, as opposed to an "N:M" pattern.
UNSTRUCTURED = "unstructured"


def check_freeze_points(quantize_start, bn_freeze, range_freeze, error=ValueError,
                        where=""):
    """Raises `error` when a freeze comes before fake-quant starts.

    Freezing before `quantize_start` would freeze statistics the model has
    not yet trained against; `None` (never) is always fine.

    Examples:
        >>> check_freeze_points(2, None, 3)
        >>> check_freeze_points(5, 3, None)
        Traceback (most recent call last):
        ...
        ValueError: bn_freeze=3 comes before quantize_start=5: 'bn_freeze' must be at or after quantize_start, or never (None; "never" in a recipe file).
    """
    for name, value in (("bn_freeze", bn_freeze), ("range_freeze", range_freeze)):
        if value is not None and value < quantize_start:
            raise error(
                f"{where}{name}={value!r} comes before quantize_start="
                f"{quantize_start!r}: '{name}' must be at or after "
                'quantize_start, or never (None; "never" in a recipe file).'
            )
