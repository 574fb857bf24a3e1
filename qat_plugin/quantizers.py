"""Fake-quantization math and the activation range observer.

Everything here is written in `keras.ops` so that a quantized model trains
on any Keras backend. The numerics follow the TFLite 8-bit specification:
weights are symmetric (zero point 0, range `[-(2^(b-1) - 1), 2^(b-1) - 1]`),
per output channel or per tensor; activations are asymmetric per tensor with
a range that always contains zero.
"""

import keras
from keras import ops
from keras.src.quantizers.quantizers import adjust_and_nudge

# A range narrower than this would give a zero scale.
_MIN_RANGE = 1e-6


def weight_scale(weight, reduce_axes, num_bits=8):
    """Returns the symmetric per-channel scale of `weight`, `max|w| / qmax`.

    Args:
        weight: the (possibly BN-folded) kernel.
        reduce_axes: the axes reduced to one scale; the remaining axes are
            the quantized (output-channel) axes. All axes gives per-tensor.
        num_bits: weight bit width.

    Returns:
        A tensor broadcastable against `weight`.

    Examples:
        >>> import numpy as np
        >>> w = np.array([[1.0, -0.5], [0.25, 2.0]], "float32")
        >>> ops.convert_to_numpy(weight_scale(w, (0,))) * 127
        array([[1., 2.]], dtype=float32)
    """
    qmax = 2 ** (num_bits - 1) - 1
    max_abs = ops.max(ops.abs(weight), axis=reduce_axes, keepdims=True)
    max_abs = ops.maximum(ops.stop_gradient(max_abs), 1e-12)
    return max_abs / qmax


def fake_quant_weight(weight, reduce_axes, num_bits=8):
    """Snaps `weight` to its symmetric int grid with a straight-through gradient.

    The scale is `max|w| / (2^(b-1) - 1)` over `reduce_axes`, so the largest
    weight of each channel maps to +-127 (8 bits) and nothing is clipped: the
    gradient of the rounding is the identity.

    Examples:
        >>> import numpy as np
        >>> w = np.array([[0.3, -1.0], [1.27, 0.5]], "float32")
        >>> q = ops.convert_to_numpy(fake_quant_weight(w, (0,)))
        >>> bool(np.all(np.abs(q - w) <= np.abs(w).max(0) / 254 + 1e-7))
        True
    """
    scale = weight_scale(weight, reduce_axes, num_bits)
    snapped = ops.round(weight / scale) * scale
    return weight + ops.stop_gradient(snapped - weight)


def integer_weight(weight, reduce_axes, num_bits=8):
    """Returns the int values and scale a weight exports to, as NumPy arrays."""
    scale = weight_scale(weight, reduce_axes, num_bits)
    values = ops.round(ops.convert_to_tensor(weight) / scale)
    return (
        ops.convert_to_numpy(values).astype("int32"),
        ops.convert_to_numpy(scale),
    )


def fake_quant_activation(x, range_min, range_max, num_bits=8):
    """Fake-quantizes an activation to `num_bits` over `[range_min, range_max]`.

    8-bit activations are asymmetric (`narrow_range=False`); 16-bit ones are
    symmetric with zero point 0, as the TFLite 16x8 scheme requires. On the
    TensorFlow backend this lowers to `FakeQuantWithMinMaxVars`, which the
    TFLite converter reads as the tensor's quantization parameters.

    Examples:
        >>> import numpy as np
        >>> x = np.array([-1.0, 0.0, 0.4, 3.0], "float32")
        >>> np.round(ops.convert_to_numpy(fake_quant_activation(x, 0.0, 2.55)), 4)
        array([0.  , 0.  , 0.4 , 2.55], dtype=float32)
    """
    return keras.quantizers.fake_quant_with_min_max_vars(
        x, range_min, range_max, num_bits=num_bits, narrow_range=num_bits == 16
    )


def fake_quant_table(table, num_bits=8):
    """Snaps a constant table to the asymmetric int grid spanning its own range.

    The converter stores a constant that an op reads as an activation (a
    GATHER table, a position table added to activations) int8 per tensor
    over its own `[min, max]` (widened to contain zero): no observer, the
    range is the table's. The gradient is the identity.

    Examples:
        >>> import numpy as np
        >>> table = np.array([[-0.5, 0.2], [1.0, 0.0]], "float32")
        >>> q = ops.convert_to_numpy(fake_quant_table(table))
        >>> bool(np.abs(q - table).max() <= 1.5 / 255 / 2 + 1e-7)
        True
    """
    range_min, range_max = clamp_range(
        ops.min(ops.stop_gradient(table)), ops.max(ops.stop_gradient(table))
    )
    return fake_quant_activation(table, range_min, range_max, num_bits)


def fake_quant_average(x, range_min, range_max, num_bits=8, divisor=None):
    """Fake-quantizes an average of values on this range's grid, as TFLite does.

    The int8 AVERAGE_POOL_2D kernels (reference and XNNPACK, measured) sum
    their int values and divide by the count rounding half away from zero;
    `fake_quant_activation` rounds half up, and float error in the average
    makes exact ties fall either way. The average of grid values is a
    multiple of `1 / count` steps: with `divisor` a multiple of every count
    (or None to skip it), the value is snapped to that first. The gradient
    is the identity (the average is always inside the range).

    Examples:
        >>> import numpy as np
        >>> # Steps of 0.1: 2.5, -2.5 and 3.5 steps round away from zero.
        >>> x = np.array([0.25, -0.25, 0.35], "float32")
        >>> y = ops.convert_to_numpy(fake_quant_average(x, -12.8, 12.7, divisor=2))
        >>> [round(float(v), 2) for v in y]
        [0.3, -0.3, 0.4]
    """
    narrow = num_bits == 16
    nudged_min, _, scale, _ = adjust_and_nudge(
        ops.convert_to_tensor(range_min, "float32"),
        ops.convert_to_tensor(range_max, "float32"),
        num_bits,
        narrow,
    )
    quant_min = 1 if narrow else 0
    levels = (1 << num_bits) - 1 - quant_min
    # Grid index -> the signed int the kernel holds: 8 bits -128..127.
    offset = quant_min - (1 << (num_bits - 1))
    value = (ops.stop_gradient(x) - nudged_min) / scale + offset
    if divisor is not None:
        value = ops.round(value * divisor) / divisor
    rounded = ops.sign(value) * ops.floor(ops.abs(value) + 0.5)
    index = ops.clip(rounded - offset, 0, levels)
    snapped = index * scale + nudged_min
    return x + ops.stop_gradient(ops.cast(snapped, x.dtype) - x)


def clamp_range(range_min, range_max, num_bits=8):
    """Makes a range legal for TFLite: it contains zero and is not empty.

    16-bit activations are symmetric, so their range is `[-m, m]`.
    """
    range_min = ops.minimum(range_min, 0.0)
    range_max = ops.maximum(range_max, 0.0)
    if num_bits == 16:
        bound = ops.maximum(-range_min, range_max)
        range_min, range_max = -bound, bound
    range_max = ops.maximum(range_max, range_min + _MIN_RANGE)
    return range_min, range_max


def select(condition, if_true, if_false):
    """`ops.where` that skips the blend when `condition` is a Python bool."""
    if condition is True:
        return if_true
    if condition is False:
        return if_false
    return ops.where(condition, if_true, if_false)


# Fixed output ranges the TFLite int8 kernels require (scale, zero point):
# LOGISTIC and SOFTMAX 1/256, -128; TANH 1/128, 0.
FIXED_RANGES = {
    "sigmoid": (0.0, 255.0 / 256.0),
    "softmax": (0.0, 255.0 / 256.0),
    "tanh": (-1.0, 127.0 / 128.0),
}
# Symmetric 16-bit: scale 2 * (32767/32768) / 65534 = 1/32768, zero point 0.
FIXED_RANGE_16 = (-32767.0 / 32768.0, 32767.0 / 32768.0)


class ActivationQuantizer:
    """Observes an activation's range and fake-quantizes it.

    The range is an exponential moving average of the batch minimum and
    maximum, seeded with the first batch; a batch holding NaN or inf is
    skipped and counted in `nonfinite_batches`. It is held in non-trainable
    variables of the owning layer, so it is saved, restored and replicated
    like any weight. A quantizer with `fixed_range` (sigmoid, softmax, tanh)
    observes nothing.

    Args:
        name: prefix of the variables on the owning layer.
        num_bits: 8 (asymmetric int8) or 16 (symmetric int16).
        ema_decay: weight of the running range against the batch range.
        fixed_range: `(min, max)` to use instead of observing.

    Examples:
        >>> layer = keras.layers.Layer()
        >>> q = ActivationQuantizer("output")
        >>> q.build(layer)
        >>> x = ops.convert_to_tensor([[-1.0, 0.5, 2.0]])
        >>> _ = q.observe(x, frozen=False)
        >>> [float(v) for v in (q.range_min, q.range_max)]
        [-1.0, 2.0]
    """

    def __init__(self, name, num_bits=8, ema_decay=0.99, fixed_range=None,
                 group=None, average_divisor=None):
        if num_bits not in (8, 16):
            raise ValueError(
                f"Activation quantizer '{name}': num_bits must be 8 or 16, "
                f"got {num_bits!r}."
            )
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(
                f"Activation quantizer '{name}': ema_decay must be in "
                f"[0, 1), got {ema_decay!r}."
            )
        self.name = name
        self.num_bits = num_bits
        self.ema_decay = float(ema_decay)
        if fixed_range is not None and num_bits == 16:
            # The int16 LOGISTIC, SOFTMAX and TANH kernels output scale
            # 1/32768, zero point 0, whatever the float range.
            fixed_range = FIXED_RANGE_16
        self.fixed_range = None if fixed_range is None else tuple(fixed_range)
        if group is not None and self.fixed_range is not None:
            raise ValueError(
                f"Activation quantizer '{name}': a fixed range is the int8 "
                f"kernel's own scale; it cannot join range group '{group.name}'."
            )
        self.group = group
        self.average_divisor = average_divisor

    def build(self, layer):
        """Creates the range variables on `layer`."""
        if self.fixed_range is not None:
            return
        # The range starts empty (min > max): "never observed" is a state of
        # its own, apart from a constant activation's zero-width range.
        self.range_min = self._state(layer, "min", "ones")
        self.range_max = self._state(layer, "max", keras.initializers.Constant(-1.0))
        # Batches with NaN or inf that the observer skipped.
        self.nonfinite_batches = self._state(layer, "nonfinite_batches", "zeros")
        if self.group is not None:
            self.group.join(self, layer)

    def _state(self, layer, name, initializer):
        return layer.add_weight(
            name=f"{self.name}_{name}", shape=(), initializer=initializer, trainable=False,
            aggregation="mean", dtype="float32",
        )

    @property
    def observed(self):
        """A boolean tensor: has this quantizer seen any (finite) data yet."""
        if self.fixed_range is not None:
            return ops.convert_to_tensor(True)
        return ops.less_equal(self.range_min, self.range_max)

    def current_range(self):
        """Returns the (min, max) the next fake-quant uses."""
        if self.fixed_range is not None:
            return self.fixed_range
        return self._clamped(self.range_min, self.range_max)

    def _clamped(self, range_min, range_max):
        if self.group is not None:
            range_min, range_max = self.group.cover(self, range_min, range_max)
        return clamp_range(range_min, range_max, self.num_bits)

    def observe(self, x, frozen):
        """Updates the running range from batch `x` unless `frozen`.

        `frozen` is a boolean tensor, or a Python bool known at trace time.

        Returns the updated `(min, max)` so that the caller quantizes with the
        range that includes this batch, as the exported model will.
        """
        if self.fixed_range is not None:
            return self.fixed_range
        if frozen is True:
            return self.current_range()
        x = ops.stop_gradient(x)
        batch_min = ops.cast(ops.min(x), "float32")
        batch_max = ops.cast(ops.max(x), "float32")
        # min and max carry a NaN through on every backend: a batch with NaN
        # or inf anywhere is skipped, not averaged into the range.
        finite = ops.logical_and(ops.isfinite(batch_min), ops.isfinite(batch_max))
        # jnp.where does not read Keras variables: pass their values.
        old_min = ops.convert_to_tensor(self.range_min)
        old_max = ops.convert_to_tensor(self.range_max)
        seeded = ops.less_equal(old_min, old_max)
        decay = self.ema_decay
        new_min = ops.where(seeded, decay * old_min + (1 - decay) * batch_min, batch_min)
        new_max = ops.where(seeded, decay * old_max + (1 - decay) * batch_max, batch_max)
        keep = ops.logical_not(finite)
        if frozen is not False:
            keep = ops.logical_or(keep, frozen)
        new_min = ops.where(keep, old_min, new_min)
        new_max = ops.where(keep, old_max, new_max)
        self.range_min.assign(new_min)
        self.range_max.assign(new_max)
        skipped = ops.logical_not(finite)
        if frozen is not False:
            skipped = ops.logical_and(skipped, ops.logical_not(frozen))
        self.nonfinite_batches.assign_add(ops.cast(skipped, "float32"))
        if self.group is not None:
            self.group.record(self, new_min, new_max)
        return self._clamped(new_min, new_max)

    def quantize(self, x, range_min, range_max):
        """Fake-quantizes `x` to the given range (the op the export reads)."""
        return fake_quant_activation(x, range_min, range_max, self.num_bits)

    def simulate(self, x, range_min, range_max):
        """Computes what the int8 kernel outputs: `quantize`, or for an
        average (`average_divisor` set) its rounding of ties."""
        if self.average_divisor is None:
            return self.quantize(x, range_min, range_max)
        return fake_quant_average(
            x, range_min, range_max, self.num_bits, self.average_divisor
        )

    def get_config(self):
        # The group is the owning layer's to serialize: it is shared.
        return {
            "name": self.name,
            "num_bits": self.num_bits,
            "ema_decay": self.ema_decay,
            "fixed_range": None
            if self.fixed_range is None
            else list(self.fixed_range),
            "average_divisor": self.average_divisor,
        }
