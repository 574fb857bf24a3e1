"""`QATModel`: the Functional model `quantize_model` returns."""

import keras

from qat_plugin.errors import ExportError

# Set by `qat_plugin.tflite` when it is imported (it sits above this stage):
# the function `QATModel.export` hands `format="litert"` to.
_litert_exporter = []


def set_litert_exporter(function):
    """Makes `function(model, path)` the exporter of `QATModel.export(format="litert")`."""
    _litert_exporter[:] = [function]


@keras.saving.register_keras_serializable(package="qat_plugin")
class QATModel(keras.Model):
    """A Functional model with fake-quant, as `quantize_model` builds it.

    It trains, saves and loads as any Functional model. Its one difference:
    Keras' own `export(path, format="litert")` would convert the fake-quant
    graph as a float model (float CONV_2D and FULLY_CONNECTED between the
    fake-quant ops) and pass converter settings meant for post-training
    quantization; here it writes the fully-int8 file `export_tflite` writes.
    An input with undefined sizes takes its fixed shape from
    `input_signature` (a `keras.InputSpec` per input, batch axis first) or
    `input_shape=` (as in `export_tflite`).

    Examples:
        >>> import keras, numpy as np, os, tempfile, qat_plugin
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> qat = qat_plugin.quantize_model(model)
        >>> _ = qat_plugin.calibrate(qat, np.random.rand(8, 4).astype("float32"))
        >>> path = os.path.join(tempfile.mkdtemp(), "model.tflite")
        >>> qat.export(path, format="litert", verbose=False)
        >>> with open(path, "rb") as f:
        ...     qat_plugin.inspect_tflite(f.read()).is_fully_int8
        True
    """

    def export(self, filepath, format="tf_saved_model", verbose=None,
               input_signature=None, **kwargs):
        if format != "litert":
            return super().export(filepath, format=format, verbose=verbose,
                                  input_signature=input_signature, **kwargs)
        input_shape = kwargs.pop("input_shape", None)
        if kwargs:
            raise ExportError(
                f"QAT model '{self.name}': export(format='litert') takes no "
                f"converter settings ({', '.join(sorted(kwargs))} given): a QAT "
                "model exports fully int8 with the ranges it learned; only "
                "input_signature or input_shape (the fixed input shapes) are "
                "taken. For export options (target, sparse_weights, ...) call "
                "qat_plugin.export_tflite(model, path, ...)."
            )
        if not _litert_exporter:
            raise ExportError(
                "QATModel.export(format='litert') needs qat_plugin's TFLite "
                "export: `import qat_plugin` (or call qat_plugin.export_tflite)."
            )
        _litert_exporter[0](self, filepath, input_shape=input_shape,
                            input_signature=input_signature)
        if verbose is not False:  # Keras' exports print unless told not to.
            print(f"Saved the int8 LiteRT model to {filepath}")


# A saved QAT model records its class's module; loading it without qat_plugin
# imported then fails with Keras' "Could not locate class 'QATModel' ... make
# sure they are all imported ... {'module': 'qat_plugin', ...}": the package
# to import, as numpy's public classes name `numpy`.
QATModel.__module__ = "qat_plugin"
