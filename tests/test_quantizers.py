"""Fake-quant math and the range observer against NumPy references."""

import keras
import numpy as np
import pytest
from keras import ops

from qat_plugin.quantizers import (
    ActivationQuantizer,
    clamp_range,
    fake_quant_activation,
    fake_quant_average,
    fake_quant_weight,
    integer_weight,
)
from qat_plugin.range_groups import RangeGroup


def numpy_fake_quant(x, range_min, range_max, num_bits=8):
    """TensorFlow's FakeQuantWithMinMaxVars: nudged zero point, then round."""
    qmin, qmax = 0, 2**num_bits - 1
    scale = (range_max - range_min) / (qmax - qmin)
    zero_point = np.clip(np.round(qmin - range_min / scale), qmin, qmax)
    nudged_min = (qmin - zero_point) * scale
    nudged_max = (qmax - zero_point) * scale
    clipped = np.clip(x, nudged_min, nudged_max)
    return np.round((clipped - nudged_min) / scale) * scale + nudged_min


def test_activation_fake_quant_matches_numpy_reference():
    rng = np.random.default_rng(1)
    x = rng.normal(size=1000).astype("float32") * 3
    got = ops.convert_to_numpy(fake_quant_activation(x, -2.3, 4.1))
    want = numpy_fake_quant(x.astype("float64"), -2.3, 4.1)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # 256 levels at most, zero exactly representable.
    assert len(np.unique(got)) <= 256
    assert ops.convert_to_numpy(fake_quant_activation(np.zeros(3, "float32"), -2.3, 4.1)).tolist() == [0, 0, 0]


def test_average_fake_quant_rounds_int_sums_half_away_from_zero():
    # What TFLite's int8 AVERAGE_POOL_2D does: sum the int8 values of a
    # window, divide by the count, round half away from zero.
    rng = np.random.default_rng(3)
    range_min, range_max = -0.9, 2.3
    scale = (range_max - range_min) / 255
    zero_point = np.round(-128 - range_min / scale)  # int8 zero point
    ints = rng.integers(-128, 128, size=(4000, 4))
    sums = ints.sum(axis=1)
    want_ints = np.where(sums > 0, (sums + 2) // 4, -((-sums + 2) // 4))
    grid = ((ints - zero_point) * scale).astype("float32")
    got = ops.convert_to_numpy(
        fake_quant_average(grid.mean(axis=1), range_min, range_max, divisor=4)
    )
    np.testing.assert_allclose(got, (want_ints - zero_point) * scale, atol=1e-5)
    ties = sums % 4 == 2
    assert ties.sum() > 500 and np.any(ties & (sums < 0))


def test_average_fake_quant_16_bits_snaps_exactly_at_the_top_of_the_range():
    # int16: symmetric, zero point 0; averages of up to 9 values near 32767.
    scale = 1.0 / 32768
    range_max = 32767 * scale
    rng = np.random.default_rng(4)
    ints = rng.integers(32000, 32768, size=(2000, 6))
    sums = ints.sum(axis=1)
    want = np.where(sums > 0, (2 * sums + 6) // 12, -((-2 * sums + 6) // 12))
    grid = (ints * scale).astype("float32")
    got = ops.convert_to_numpy(
        fake_quant_average(grid.mean(axis=1), -range_max, range_max, 16, 36)
    )
    np.testing.assert_array_equal(np.round(got / scale), want)


def test_range_group_members_quantize_with_the_union_of_their_ranges():
    layer = keras.layers.Layer()
    group = RangeGroup("block")
    a = ActivationQuantizer("a", group=group)
    b = ActivationQuantizer("b", group=group)
    alone = ActivationQuantizer("alone")
    for quantizer in (a, b, alone):
        quantizer.build(layer)
    a.observe(ops.convert_to_tensor([0.0, 1.0]), frozen=False)
    assert [float(v) for v in a.current_range()] == [0.0, 1.0]  # b unseen
    b.observe(ops.convert_to_tensor([-0.5, 3.0]), frozen=False)
    alone.observe(ops.convert_to_tensor([-9.0, 9.0]), frozen=False)
    for quantizer in (a, b):
        assert [float(v) for v in quantizer.current_range()] == [-0.5, 3.0]
    assert float(a.range_max) == 1.0  # Each keeps observing its own tensor.
    with pytest.raises(ValueError, match="fixed range.*range group 'block'"):
        ActivationQuantizer("sigmoid", fixed_range=(0.0, 1.0), group=group)


def test_weight_fake_quant_is_symmetric_per_channel():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(3, 3, 4, 5)).astype("float32")
    w[..., 2] *= 100  # one channel with a much larger range
    got = ops.convert_to_numpy(fake_quant_weight(w, (0, 1, 2)))
    scale = np.abs(w).max(axis=(0, 1, 2), keepdims=True) / 127
    want = np.round(w / scale) * scale
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    values, exported_scale = integer_weight(w, (0, 1, 2))
    assert values.min() >= -127 and values.max() <= 127
    assert np.all(np.abs(values).max(axis=(0, 1, 2)) == 127)
    np.testing.assert_allclose(exported_scale, scale, rtol=1e-6)


def test_weight_fake_quant_per_tensor():
    w = np.array([[0.5, -2.0], [1.0, 0.01]], "float32")
    got = ops.convert_to_numpy(fake_quant_weight(w, (0, 1)))
    scale = 2.0 / 127
    np.testing.assert_allclose(got, np.round(w / scale) * scale, atol=1e-7)


@pytest.mark.tf_only
def test_weight_fake_quant_has_straight_through_gradient():
    import tensorflow as tf

    w = tf.Variable(np.linspace(-1, 1, 12, dtype="float32").reshape(3, 4))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(fake_quant_weight(w, (0,)) * 3.0)
    np.testing.assert_allclose(tape.gradient(loss, w).numpy(), np.full((3, 4), 3.0))


def test_clamp_range_includes_zero_and_is_symmetric_for_16_bits():
    lo, hi = clamp_range(0.5, 2.0)
    assert (float(lo), float(hi)) == (0.0, 2.0)
    lo, hi = clamp_range(-3.0, 1.0, num_bits=16)
    assert (float(lo), float(hi)) == (-3.0, 3.0)
    lo, hi = clamp_range(0.0, 0.0)
    assert float(hi) > float(lo)


def test_observer_seeds_then_averages_then_freezes():
    layer = keras.layers.Layer()
    quantizer = ActivationQuantizer("out", ema_decay=0.9)
    quantizer.build(layer)
    assert not bool(quantizer.observed)
    quantizer.observe(ops.convert_to_tensor([-1.0, 2.0]), frozen=False)
    assert [float(quantizer.range_min), float(quantizer.range_max)] == [-1.0, 2.0]
    quantizer.observe(ops.convert_to_tensor([-3.0, 12.0]), frozen=False)
    np.testing.assert_allclose(
        [float(quantizer.range_min), float(quantizer.range_max)],
        [0.9 * -1 + 0.1 * -3, 0.9 * 2 + 0.1 * 12],
        rtol=1e-6,
    )
    before = (float(quantizer.range_min), float(quantizer.range_max))
    quantizer.observe(ops.convert_to_tensor([-100.0, 100.0]), frozen=True)
    assert (float(quantizer.range_min), float(quantizer.range_max)) == before


@pytest.mark.parametrize(
    "kwargs, message",
    [({"num_bits": 4}, "num_bits must be 8 or 16"), ({"ema_decay": 1.0}, "ema_decay")],
)
def test_observer_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ActivationQuantizer("output", **kwargs)


def test_observer_skips_and_counts_nonfinite_batches():
    layer = keras.layers.Layer()
    quantizer = ActivationQuantizer("out", ema_decay=0.5)
    quantizer.build(layer)
    # A first batch with NaN seeds nothing: the range is still unobserved.
    quantizer.observe(ops.convert_to_tensor([np.nan, 1.0]), frozen=False)
    assert not bool(quantizer.observed) and float(quantizer.nonfinite_batches) == 1
    quantizer.observe(ops.convert_to_tensor([-1.0, 2.0]), frozen=False)
    for bad in ([np.inf, 0.0], [-np.inf, 0.0], [np.nan, np.nan]):
        lo, hi = quantizer.observe(ops.convert_to_tensor(bad), frozen=False)
        assert [float(lo), float(hi)] == [-1.0, 2.0]
    assert [float(quantizer.range_min), float(quantizer.range_max)] == [-1.0, 2.0]
    assert float(quantizer.nonfinite_batches) == 4
    # Frozen ranges skip everything: nothing is counted.
    quantizer.observe(ops.convert_to_tensor([np.nan]), frozen=ops.convert_to_tensor(True))
    assert float(quantizer.nonfinite_batches) == 4


def test_a_constant_activation_is_observed_with_a_zero_width_range():
    layer = keras.layers.Layer()
    quantizer = ActivationQuantizer("out")
    quantizer.build(layer)
    quantizer.observe(ops.convert_to_tensor([0.0, 0.0]), frozen=False)
    assert bool(quantizer.observed)
    lo, hi = (float(v) for v in quantizer.current_range())
    assert lo == 0.0 and 0.0 < hi <= 1e-5  # the smallest legal range
    constant = ActivationQuantizer("c")
    constant.build(layer)
    constant.observe(ops.convert_to_tensor([3.0, 3.0]), frozen=False)
    assert [float(v) for v in constant.current_range()] == [0.0, 3.0]


def test_a_range_group_forgets_a_member_range_one_cycle_after_it_shrinks():
    layer = keras.layers.Layer()
    group = RangeGroup("chain")
    a = ActivationQuantizer("a", group=group, ema_decay=0.0)
    b = ActivationQuantizer("b", group=group, ema_decay=0.0)
    a.build(layer)
    b.build(layer)
    assert group.holder == f"{layer.name}/a" and len(layer.weights) == 7

    def step(b_values):
        a.observe(ops.convert_to_tensor([0.0, 1.0]), frozen=False)
        return b.observe(ops.convert_to_tensor(b_values), frozen=False)

    assert [float(v) for v in step([-4.0, 8.0])] == [-4.0, 8.0]
    # b shrinks: the cycle before still holds its old range ...
    assert [float(v) for v in step([0.0, 2.0])] == [-4.0, 8.0]
    # ... and one cycle later only the members' latest ranges count.
    assert [float(v) for v in step([0.0, 2.0])] == [0.0, 2.0]
    assert [float(v) for v in a.current_range()] == [0.0, 2.0]
    assert RangeGroup.from_config(group.get_config()).holder == group.holder
