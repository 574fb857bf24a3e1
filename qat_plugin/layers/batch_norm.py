"""BatchNormalization with no op before it to fold into, quantized."""

import keras
from keras import ops

from qat_plugin.layers.base import (
    QuantizedLayer,
    batch_norm_affine,
    build_replica_synced,
    check_fused_activation,
    update_moving_statistics,
)
from qat_plugin.layers.modes import is_exporting
from qat_plugin.linear_ops import channel_vector
from qat_plugin.quantizers import select


@keras.saving.register_keras_serializable(package="qat_plugin")
class QuantizedBatchNormalization(QuantizedLayer):
    """A BatchNormalization kept as a per-channel affine: int8 MUL then ADD.

    Pre-activation ResNets and DenseNets normalize tensors that no
    convolution produced, so there is nothing to fold into. The TFLite
    converter turns such a BatchNormalization into MUL and ADD by per-channel
    constants; each gets its own output fake-quant here, and a following
    ReLU/ReLU6 is fused into the ADD. In training the layer normalizes with
    batch statistics and updates its moving statistics like
    BatchNormalization.

    Args:
        layer: the BatchNormalization layer (a fresh copy).
        activation: `"linear"`, `"relu"` or `"relu6"`, fused after the ADD.
        num_bits: activation bit width.
        ema_decay: decay of the range observers.

    Examples:
        >>> import numpy as np
        >>> bn = QuantizedBatchNormalization(keras.layers.BatchNormalization())
        >>> tuple(bn(np.random.rand(4, 3).astype("float32"), training=True).shape)
        (4, 3)
    """

    _sublayer_keys = ("layer",)

    def __init__(self, layer, activation="linear", num_bits=8, ema_decay=0.99,
                 **kwargs):
        kwargs.setdefault("name", layer.name)
        super().__init__(num_bits=num_bits, ema_decay=ema_decay, **kwargs)
        check_fused_activation(layer.name, activation)
        self.layer = layer
        self.activation = activation
        self.scale_quantizer = self._activation_quantizer("scaled")
        self.output_quantizer = self._activation_quantizer("output")

    def build(self, input_shape):
        if not self.layer.built:
            build_replica_synced(self.layer, input_shape)
        self._build_quantization_state()

    def activation_quantizers(self):
        return [self.scale_quantizer, self.output_quantizer]

    def export_constants(self):
        scale, shift = batch_norm_affine(self.layer, 
            self.layer.moving_mean, self.layer.moving_variance
        )
        return {
            "scale": ops.convert_to_numpy(scale),
            "shift": ops.convert_to_numpy(shift),
        }

    def call(self, inputs, training=False):
        quantize, bn_frozen, ranges_frozen = self._phase(training)
        rank = len(inputs.shape)
        bn = self.layer
        if is_exporting():
            scale = ops.convert_to_tensor(self._export_constants["scale"])
            shift = ops.convert_to_tensor(self._export_constants["shift"])
        else:
            scale, shift = batch_norm_affine(self.layer, bn.moving_mean, bn.moving_variance)
            if training and bn_frozen is not True:
                axis = bn.axis % rank
                reduce_axes = [i for i in range(rank) if i != axis]
                mean, variance = ops.moments(inputs, axes=reduce_axes)
                batch_scale, batch_shift = batch_norm_affine(self.layer, mean, variance)
                scale = select(bn_frozen, scale, batch_scale)
                shift = select(bn_frozen, shift, batch_shift)
                update_moving_statistics(bn, mean, variance, bn_frozen)
        outputs = inputs * channel_vector(scale, rank, bn.axis)
        outputs = self._quantize_activation(
            self.scale_quantizer, outputs, quantize, ranges_frozen, training
        )
        outputs = outputs + channel_vector(shift, rank, bn.axis)
        return self._finish(outputs, quantize, ranges_frozen, training, self.activation)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "activation": self.activation,
            }
        )
        return config
