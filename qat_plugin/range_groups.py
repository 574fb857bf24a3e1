"""`RangeGroup`: activations that must share one int8 scale."""

import keras
from keras import ops
from keras.src.saving import serialization_lib


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

    def __init__(self, name):
        self.name = name
        self._members = []

    def join(self, quantizer):
        """Adds `quantizer` (once) to the group."""
        if not any(member is quantizer for member in self._members):
            self._members.append(quantizer)

    def cover(self, quantizer, range_min, range_max):
        """Widens `quantizer`'s range to the other observed members' ranges."""
        # jnp.where does not read Keras variables: pass their values.
        range_min = ops.convert_to_tensor(range_min)
        range_max = ops.convert_to_tensor(range_max)
        for other in self._members:
            if other is quantizer:
                continue
            seen = other.observed
            other_min = ops.convert_to_tensor(other.range_min)
            other_max = ops.convert_to_tensor(other.range_max)
            range_min = ops.where(seen, ops.minimum(range_min, other_min), range_min)
            range_max = ops.where(seen, ops.maximum(range_max, other_max), range_max)
        return range_min, range_max

    def get_config(self):
        return {"name": self.name}

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
