"""The base class of every quantized layer: schedule state and export constants."""

import keras
import numpy as np
from keras import ops

from qat_plugin.config.constants import FUSED_ACTIVATIONS, NEVER
from qat_plugin.layers.modes import current_probe, is_calibrating, is_exporting
from qat_plugin.quantizers import ActivationQuantizer, select

# [quantize_start, bn_freeze, range_freeze]: quantize from the first step,
# never freeze.
DEFAULT_SCHEDULE = (0, NEVER, NEVER)


def static_phase(schedule, step, steps_ahead=None):
    """Which switches are settled for the next `steps_ahead` training steps.

    Returns a tuple of three: True where the switch has fired (steps only
    grow), False where it cannot fire within `steps_ahead` steps (or never
    fires), None where it may fire and must be decided in-graph.

    Examples:
        >>> static_phase([0, 100, NEVER], step=10, steps_ahead=50)
        (True, False, False)
        >>> static_phase([0, 100, NEVER], step=10)
        (True, None, False)
    """
    settled = []
    for threshold in schedule:
        if threshold <= step:
            settled.append(True)
        elif threshold == NEVER or (
            steps_ahead is not None and threshold >= step + steps_ahead
        ):
            settled.append(False)
        else:
            settled.append(None)
    return tuple(settled)


# Activations TFLite fuses into the op before them, as functions.
FUSED_ACTIVATION_FUNCTIONS = dict(zip(FUSED_ACTIVATIONS, (None, ops.relu, ops.relu6)))


def check_fused_activation(layer_name, activation):
    """Raises unless `activation` is one TFLite fuses into the op."""
    if activation not in FUSED_ACTIVATION_FUNCTIONS:
        raise ValueError(
            f"Layer '{layer_name}': activation {activation!r} cannot be "
            f"fused; expected one of {sorted(FUSED_ACTIVATION_FUNCTIONS)}."
        )


def batch_norm_scale(bn, variance):
    """`gamma / sqrt(variance + epsilon)`: what a BatchNormalization multiplies by."""
    scale = ops.rsqrt(variance + bn.epsilon)
    return scale * bn.gamma if bn.scale else scale


def batch_norm_affine(bn, mean, variance):
    """`(scale, shift)` of the per-channel affine a BatchNormalization computes.

    Examples:
        >>> import keras, numpy as np
        >>> bn = keras.layers.BatchNormalization(epsilon=0.0)
        >>> bn.build((None, 2))
        >>> scale, shift = batch_norm_affine(bn, np.float32([1, 2]), np.float32([4, 1]))
        >>> [float(v) for v in scale], [float(v) for v in shift]
        ([0.5, 1.0], [-0.5, -2.0])
    """
    scale = batch_norm_scale(bn, variance)
    shift = -mean * scale
    if bn.center:
        shift = shift + bn.beta
    return scale, shift


def update_moving_statistics(bn, mean, variance, frozen):
    """Moves a BatchNormalization's statistics towards a batch's, unless frozen.

    `frozen` is a Python bool or a boolean tensor decided in-graph: the
    variables are always assigned, to themselves while frozen.
    """
    for variable, value in ((bn.moving_mean, mean), (bn.moving_variance, variance)):
        updated = variable * bn.momentum + ops.stop_gradient(value) * (1 - bn.momentum)
        variable.assign(select(frozen, ops.convert_to_tensor(variable), updated))


def build_replica_synced(layer, input_shape):
    """Builds `layer` with its non-trainable weights averaged over replicas.

    Keras creates BatchNormalization's moving statistics with aggregation
    "none": under `tf.distribute.MirroredStrategy` each replica then keeps
    its own copy and the copies drift apart, and a quantized layer folds
    them into its kernels, so once BatchNorm freezes the replicas would
    train different int8 weights. Built here, those weights get aggregation
    "mean", as the range observers have: every update is the mean of the
    replicas' updates and all replicas hold the same value.

    Examples:
        >>> import keras
        >>> bn = keras.layers.BatchNormalization()
        >>> build_replica_synced(bn, (None, 3))
        >>> bn.moving_mean.aggregation, bn.gamma.aggregation
        ('mean', 'none')
    """
    add_weight = layer.add_weight

    def add_synced_weight(*args, **kwargs):
        if not kwargs.get("trainable", True) and kwargs.get("aggregation") in (
            None,
            "none",
        ):
            kwargs["aggregation"] = "mean"
        return add_weight(*args, **kwargs)

    layer.add_weight = add_synced_weight
    try:
        layer.build(input_shape)
    finally:
        del layer.add_weight


class QuantizedLayer(keras.layers.Layer):
    """Base of the quantized layers: owns the QAT schedule state.

    Each quantized layer counts its own training steps in a non-trainable
    variable and compares the count with three thresholds, also variables:
    when fake-quant starts (before it, observers only), when BatchNorm
    statistics freeze and when activation ranges freeze. The switches are
    therefore part of the compiled graph: changing a threshold never retraces,
    and they fire at the exact step even with `steps_per_execution > 1`.

    Subclasses call `self._build_quantization_state()` in `build`, get the current
    phase from `self._phase(training)` and call `self._advance(training)` at
    the end of `call`.

    Args:
        num_bits: activation bit width (8, or 16 for 16x8 models).
        ema_decay: decay of the activation range observers.
        range_group: a `RangeGroup` the output quantizer shares its range
            with (tensors that must have one scale, e.g. around a
            concatenation), or None.
    """

    def __init__(self, num_bits=8, ema_decay=0.99, range_group=None, **kwargs):
        super().__init__(**kwargs)
        self.num_bits = num_bits
        self.ema_decay = ema_decay
        self.range_group = range_group
        self._export_constants = None
        self._export_ranges = {}

    def _activation_quantizer(self, name, fixed_range=None, average_divisor=None,
                              grouped=None):
        """A quantizer; the one named "output" (or `grouped`) joins the
        layer's range group."""
        in_group = (name == "output" if grouped is None else grouped) and (
            fixed_range is None)
        return ActivationQuantizer(
            name,
            num_bits=self.num_bits,
            ema_decay=self.ema_decay,
            fixed_range=fixed_range,
            group=self.range_group if in_group else None,
            average_divisor=average_divisor,
        )

    def _build_quantization_state(self):
        """Creates the schedule variables and every activation quantizer's range."""
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
            initializer=keras.initializers.Constant(DEFAULT_SCHEDULE),
            trainable=False,
        )
        self.static_phase = static_phase(DEFAULT_SCHEDULE, step=0)
        for quantizer in self.activation_quantizers():
            quantizer.build(self)

    def set_qat_schedule(self, schedule, steps_ahead=None):
        """Sets the switch steps and what the next training steps can skip.

        `schedule` is `[quantize_start, bn_freeze, range_freeze]` in this
        layer's steps. Switches that cannot fire within the next
        `steps_ahead` training steps are traced as constants, so the train
        function computes only the branch in force; the others are decided
        in-graph at every step. A switch baked in this way only changes when
        the train function is traced again (`QuantizationScheduler` does
        that); assign `qat_schedule` directly only between fits.
        """
        self.qat_schedule.assign(schedule)
        step = int(ops.convert_to_numpy(self.qat_step))
        self.static_phase = static_phase(schedule, step, steps_ahead)

    def load_own_variables(self, store):
        super().load_own_variables(store)
        self.static_phase = static_phase(
            ops.convert_to_numpy(self.qat_schedule).tolist(),
            int(ops.convert_to_numpy(self.qat_step)),
        )

    def activation_quantizers(self):
        """Returns this layer's `ActivationQuantizer`s: its output's, if any."""
        quantizer = getattr(self, "output_quantizer", None)
        return [] if quantizer is None else [quantizer]

    def _phase(self, training):
        """Returns (quantize, bn_frozen, ranges_frozen).

        Each is a Python bool where `static_phase` says the switch cannot
        change during training, else a boolean tensor decided in-graph.
        """
        if is_exporting():
            # The int8 file always quantizes: no switch in the export graph.
            return True, True, True
        step = self.qat_step
        if training and not is_calibrating():
            return tuple(
                known if known is not None
                else ops.greater_equal(step, self.qat_schedule[index])
                for index, known in enumerate(self.static_phase)
            )
        quantize = ops.greater_equal(step, self.qat_schedule[0])
        if is_calibrating():
            return quantize, True, False
        return quantize, True, True

    def _advance(self, training):
        if training and not is_calibrating():
            self.qat_step.assign_add(1)

    def _quantize_activation(self, quantizer, x, quantize, ranges_frozen,
                             training, observe=True):
        """Observes (when training, unless not `observe`) and fake-quantizes
        `x` with `quantizer`."""
        if is_exporting():
            return quantizer.quantize(x, *self.range_of(quantizer))
        observing = observe and (training or is_calibrating()) and (
            quantizer.fixed_range is None)
        if observing:
            range_min, range_max = quantizer.observe(x, ranges_frozen)
        else:
            range_min, range_max = self.range_of(quantizer)
        probe = current_probe()
        if probe is not None:
            probe.append((self, quantizer, x, range_min, range_max))
        if quantize is False:
            return x
        # An observer that has just seen this batch always has a range.
        enabled = quantize if observing else ops.logical_and(quantize, quantizer.observed)
        return select(enabled, quantizer.simulate(x, range_min, range_max), x)

    def _finish(self, outputs, quantize, ranges_frozen, training, activation="linear"):
        """The tail of every `call`: fused activation, output fake-quant, step."""
        function = FUSED_ACTIVATION_FUNCTIONS[activation]
        if function is not None:
            outputs = function(outputs)
        outputs = self._quantize_activation(
            self.output_quantizer, outputs, quantize, ranges_frozen, training
        )
        self._advance(training)
        return outputs

    def export_constants(self):
        """Returns the NumPy constants this layer exports with (or None)."""
        return None

    def prepare_export(self):
        """Computes the export constants; called eagerly before tracing.

        The activation ranges are read here too, so that the export graph
        holds constants instead of the range variables and the arithmetic
        of range groups and clamping.
        """
        self._export_constants = self.export_constants()
        self._export_ranges = {
            id(quantizer): tuple(
                np.float32(ops.convert_to_numpy(bound)) for bound in quantizer.current_range()
            )
            for quantizer in self.activation_quantizers()
        }

    def range_of(self, quantizer):
        """`quantizer`'s current range; while exporting, the one `prepare_export` read."""
        if is_exporting() and id(quantizer) in self._export_ranges:
            return self._export_ranges[id(quantizer)]
        return quantizer.current_range()

    # Attributes holding wrapped Keras layers, serialized in the config.
    _sublayer_keys = ()

    def get_config(self):
        config = super().get_config()
        config.update({"num_bits": self.num_bits, "ema_decay": self.ema_decay})
        if self.range_group is not None:
            config["range_group"] = keras.saving.serialize_keras_object(
                self.range_group
            )
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
        if config.get("range_group") is not None:
            config["range_group"] = keras.saving.deserialize_keras_object(
                config["range_group"]
            )
        for key in cls._sublayer_keys:
            if config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


def quantized_layers(model):
    """Returns the `QuantizedLayer`s of a model built by `quantize_model`."""
    return [layer for layer in model.layers if isinstance(layer, QuantizedLayer)]


def is_quantized(model):
    """True when `model` was built by `quantize_model`."""
    return bool(quantized_layers(model))
