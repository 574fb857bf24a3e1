"""The base class of every quantized layer: schedule state and export mode."""

import contextlib
import threading

import keras
from keras import ops

from qat_plugin.quantizers import ActivationQuantizer

# The step at which a switch never happens (int32 max).
NEVER = 2**31 - 1

_mode = threading.local()


@contextlib.contextmanager
def export_mode():
    """Traces quantized layers with their int weights baked in as constants.

    Inside this context each quantized layer uses the kernels computed by
    `export_constants()` (folded, snapped to the int grid, as NumPy arrays)
    instead of computing them from its variables. The TFLite converter then
    sees float constants that are exactly on the per-channel int8 grid, and
    writes them with exactly those scales; this also sidesteps the
    converter's failure on per-channel fake-quant of FULLY_CONNECTED weights.
    """
    previous = getattr(_mode, "exporting", False)
    _mode.exporting = True
    try:
        yield
    finally:
        _mode.exporting = previous


@contextlib.contextmanager
def calibration_mode():
    """Runs quantized layers in inference mode while their observers update.

    Used by `qat_plugin.calibrate`: BatchNormalization statistics and the
    schedule stay as they are, activation ranges learn from the data.
    """
    previous = getattr(_mode, "calibrating", False)
    _mode.calibrating = True
    try:
        yield
    finally:
        _mode.calibrating = previous


def is_exporting():
    return getattr(_mode, "exporting", False)


def is_calibrating():
    return getattr(_mode, "calibrating", False)


class QuantizedLayer(keras.layers.Layer):
    """Base of the quantized layers: owns the QAT schedule state.

    Each quantized layer counts its own training steps in a non-trainable
    variable and compares the count with three thresholds, also variables:
    when fake-quant starts (before it, observers only), when BatchNorm
    statistics freeze and when activation ranges freeze. The switches are
    therefore part of the compiled graph: changing a threshold never retraces,
    and they fire at the exact step even with `steps_per_execution > 1`.

    Subclasses call `self._build_schedule()` in `build`, get the current
    phase from `self._phase(training)` and call `self._advance(training)` at
    the end of `call`.

    Args:
        num_bits: activation bit width (8, or 16 for 16x8 models).
        ema_decay: decay of the activation range observers.
    """

    def __init__(self, num_bits=8, ema_decay=0.99, **kwargs):
        super().__init__(**kwargs)
        self.num_bits = num_bits
        self.ema_decay = ema_decay
        self._export_constants = None

    def _activation_quantizer(self, name, fixed_range=None):
        return ActivationQuantizer(
            name,
            num_bits=self.num_bits,
            ema_decay=self.ema_decay,
            fixed_range=fixed_range,
        )

    def _build_schedule(self):
        self.qat_step = self.add_weight(
            name="qat_step",
            shape=(),
            dtype="int32",
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
        )
        # [quantize_start, bn_freeze, range_freeze], in this layer's steps.
        self.qat_schedule = self.add_weight(
            name="qat_schedule",
            shape=(3,),
            dtype="int32",
            initializer=keras.initializers.Constant([0, NEVER, NEVER]),
            trainable=False,
        )

    def activation_quantizers(self):
        """Returns this layer's `ActivationQuantizer`s."""
        return []

    def _phase(self, training):
        """Returns (quantize, bn_frozen, ranges_frozen) as boolean tensors."""
        step = self.qat_step
        quantize = ops.greater_equal(step, self.qat_schedule[0])
        if training and not is_calibrating():
            return (
                quantize,
                ops.greater_equal(step, self.qat_schedule[1]),
                ops.greater_equal(step, self.qat_schedule[2]),
            )
        frozen = ops.convert_to_tensor(True)
        if is_calibrating():
            return quantize, frozen, ops.convert_to_tensor(False)
        return quantize, frozen, frozen

    def _advance(self, training):
        if training and not is_calibrating():
            self.qat_step.assign_add(1)

    def _quantize_activation(self, quantizer, x, quantize, ranges_frozen,
                             training):
        """Observes (when training) and fake-quantizes `x` with `quantizer`."""
        if is_exporting():
            return quantizer.quantize(x, *quantizer.current_range())
        if (training or is_calibrating()) and quantizer.fixed_range is None:
            range_min, range_max = quantizer.observe(x, ranges_frozen)
        else:
            range_min, range_max = quantizer.current_range()
        enabled = ops.logical_and(quantize, quantizer.observed)
        quantized = quantizer.quantize(x, range_min, range_max)
        return ops.where(enabled, quantized, x)

    def export_constants(self):
        """Returns the NumPy constants this layer exports with (or None)."""
        return None

    def prepare_export(self):
        """Computes the export constants; called eagerly before tracing."""
        self._export_constants = self.export_constants()

    # Attributes holding wrapped Keras layers, serialized in the config.
    _sublayer_keys = ()

    def get_config(self):
        config = super().get_config()
        config.update({"num_bits": self.num_bits, "ema_decay": self.ema_decay})
        for key in self._sublayer_keys:
            sublayer = getattr(self, key)
            config[key] = (
                None
                if sublayer is None
                else keras.saving.serialize_keras_object(sublayer)
            )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in cls._sublayer_keys:
            if config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)
