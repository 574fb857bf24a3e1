"""Select TF ("Flex") ops in an export: the refusal without them, the warning with them.

`export_tflite` raises `select_tf_ops_error`'s `ExportError` when the
converter refuses ops with no TFLite builtin, and calls
`warn_select_tf_ops` when `allow_select_tf_ops=True` let them in.
"""

import re
import warnings

from qat_plugin.errors import ExportError


def select_tf_ops_error(model, error):
    """An `ExportError` for ops with no TFLite builtin, or None for another error.

    Examples:
        >>> import keras
        >>> from qat_plugin.tflite.select_ops import select_tf_ops_error
        >>> model = keras.Sequential([keras.Input((4,))], name="net")
        >>> error = ValueError("Needs Select TF ops. TF Select ops: Erfinv")
        >>> str(select_tf_ops_error(model, error)).split(":")[0]
        "Model 'net' has ops with no TFLite builtin kernel"
    """
    text = str(error)
    if "Select TF" not in text and "flex" not in text.lower():
        return None
    listed = re.search(r"TF Select ops: ([^\n]+)", text)
    ops = listed.group(1).split(", ") if listed else sorted(
        set(re.findall(r"'tf\.([A-Za-z0-9_]+)' op is neither", text))
    )
    return ExportError(
        f"Model '{model.name}' has ops with no TFLite builtin kernel: "
        f"{', '.join(ops) or 'see the converter message below'}. They come from "
        "a float island (a layer kept by skip=) or a float model. Replace them, "
        "or export with allow_select_tf_ops=True to keep them as Select TF "
        "(Flex) ops, which needs the Flex delegate at run time.\n"
        f"Converter message: {text.strip()[:1000]}"
    )

def warn_select_tf_ops(model, data):
    """Warns, naming the Flex ops of `data` and what they cost; silent without any.

    Examples:
        >>> import keras, qat_plugin, warnings
        >>> from qat_plugin.tflite.select_ops import warn_select_tf_ops
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warn_select_tf_ops(model, qat_plugin.export_tflite(model))
        >>> caught
        []
    """
    from qat_plugin.tflite.targets import arena_plan, flex_ops

    ops = flex_ops(data)
    if ops:
        warnings.warn(
            f"Model '{model.name}' exports with Select TF ops {', '.join(ops)}: "
            f"the file is {len(data)} bytes ({arena_plan(data).weight_bytes} of "
            "them weights; each Flex op also stores its serialized TF node "
            "definition), and the runtime needs the Flex delegate, which "
            "links TensorFlow's kernels: several MB per ABI on Android/iOS "
            "against ~1 MB for the builtin-only runtime. TensorFlow Lite Micro "
            "and the GPU delegate cannot run these ops.",
            stacklevel=3,
        )

