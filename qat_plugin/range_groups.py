"""`RangeGroup`: activations that must share one int8 scale."""

import keras
from keras import ops
from keras.src.saving import serialization_lib

_INF = float("inf")


def _masked(range_min, range_max):
    """An empty range (min > max) as (+inf, -inf), the identity of a union."""
    seen = ops.less_equal(range_min, range_max)
    return ops.where(seen, range_min, _INF), ops.where(seen, range_max, -_INF)


@keras.saving.register_keras_serializable(package="qat_plugin")
class RangeGroup:
    """Activations that must share one int8 scale, quantized with one range.

    TFLite's CONCATENATION keeps one scale for its inputs and output, and so
    do the pooling, padding and reshape ops on the way to it. The converter
    gives every tensor of such a chain the concatenation's scale, and puts a
    requantize op (QUANTIZE) wherever a tensor arrives with another one.
    The tensors of a group therefore all fake-quantize with one range: each
    member keeps its own observer, and quantizes with the smallest range
    covering every member's, so they export with one scale and zero point.
    The group keeps that union in one variable on the layer of its first
    member to join (its holder), updated by each member as it observes (a
    cost linear in the group's size): while training it may still hold a member's range from the step
    before, a slightly wider range that the export then writes, so the QAT
    model and its int8 file compute with the same scale.

    The layers holding the members share the group object. `.keras` files
    keep it shared (Keras' object-sharing scope); a config copied without
    that scope gives each layer a group of its own, i.e. its own range.

    Args:
        name: the group's name, unique in its model (loading finds the
            group's members by it).

    Examples:
        >>> from qat_plugin.quantizers import ActivationQuantizer
        >>> layer = keras.layers.Layer()
        >>> group = RangeGroup("block")
        >>> a, b = ActivationQuantizer("a", group=group), ActivationQuantizer("b", group=group)
        >>> a.build(layer); b.build(layer)
        >>> _ = a.observe(ops.convert_to_tensor([0.0, 1.0]), frozen=False)
        >>> _ = b.observe(ops.convert_to_tensor([-0.5, 3.0]), frozen=False)
        >>> [float(v) for v in a.current_range()]
        [-0.5, 3.0]
    """

    def __init__(self, name, holder=None):
        self.name = name
        # "layer/quantizer" of the member whose layer holds the union: the
        # first to join, kept in the config so that a loaded model (whose
        # layers may build in another order) puts it on the same layer.
        self.holder = holder
        self._holder_quantizer = None
        self._union = None

    def join(self, quantizer, layer):
        """Adds `quantizer` to the group; the holder's `layer` gets the
        group's union (once)."""
        key = f"{layer.name}/{quantizer.name}"
        if self.holder is None:
            self.holder = key
        if key != self.holder or self._union is not None:
            return
        self._holder_quantizer = quantizer
        # Rows: the union over the last full cycle of member updates, and
        # over the cycle under way. Empty is (+inf, -inf), so a union is a
        # plain minimum and maximum.
        self._union = layer.add_weight(
            name=f"{quantizer.name}_group_union", shape=(2, 2),
            initializer=keras.initializers.Constant([[_INF, -_INF], [_INF, -_INF]]),
            trainable=False, dtype="float32", aggregation="mean",
        )

    def record(self, quantizer, range_min, range_max):
        """Adds `quantizer`'s updated range to the union under way.

        Linear in the group's size: each member adds itself to one running
        union. The holder closes the cycle under way (with its own range)
        and starts a new one, so every member's latest range is in one of
        the two rows, whatever order the members run in.
        """
        if self._union is None:  # A copy without its holder: no union.
            return
        range_min, range_max = _masked(range_min, range_max)
        union = ops.convert_to_tensor(self._union)
        widened = ops.stack([ops.minimum(union[1, 0], range_min),
                             ops.maximum(union[1, 1], range_max)])
        if quantizer is self._holder_quantizer:
            rows = [widened, ops.stack([range_min, range_max])]
        else:
            rows = [union[0], widened]
        self._union.assign(ops.stack(rows))

    def cover(self, quantizer, range_min, range_max):
        """Widens `quantizer`'s range to the union of the members' ranges."""
        if self._union is None:
            return range_min, range_max
        range_min = ops.convert_to_tensor(range_min)
        range_max = ops.convert_to_tensor(range_max)
        own_min, own_max = _masked(range_min, range_max)
        union = ops.convert_to_tensor(self._union)
        low = ops.minimum(own_min, ops.min(union[:, 0]))
        high = ops.maximum(own_max, ops.max(union[:, 1]))
        # Nothing observed yet: the member's own (empty) range.
        anything = ops.less_equal(low, high)
        return ops.where(anything, low, range_min), ops.where(anything, high, range_max)

    def get_config(self):
        return {"name": self.name, "holder": self.holder}

    @classmethod
    def from_config(cls, config):
        # Keras marks an object serialized twice as shared only in the
        # configs it still holds; the layers' copies may miss the mark, so
        # the group is found again by its name (unique in its model).
        key = ("qat_plugin.RangeGroup", config["name"])
        group = serialization_lib.get_shared_object(key)
        if group is None:
            group = cls(**config)
            serialization_lib.record_object_after_deserialization(group, key)
        return group
