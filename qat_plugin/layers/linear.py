"""Conv/Dense with folded BatchNormalization and fused activation, quantized."""

import keras
from keras import ops

from qat_plugin.layers.base import (
    QuantizedLayer,
    batch_norm_affine,
    batch_norm_scale,
    build_replica_synced,
    check_fused_activation,
    update_moving_statistics,
)
from qat_plugin.layers.modes import is_calibrating, is_exporting
from qat_plugin.linear_ops import channel_vector
from qat_plugin.registry import linear_op_for
from qat_plugin.layers.pruned import PrunedLayer
from qat_plugin.quantizers import fake_quant_weight, select

def _safe_divisor(x, epsilon=1e-12):
    return ops.where(ops.abs(x) < epsilon, epsilon, x)


@keras.saving.register_keras_serializable(package="qat_plugin")
class QuantizedLinear(QuantizedLayer):
    """A Conv/Dense layer, its BatchNormalization and activation as one int8 op.

    The kernel is folded with the BatchNormalization that follows it and
    fake-quantized symmetrically per output channel; the output is
    fake-quantized once, after the fused ReLU/ReLU6, exactly where the int8
    TFLite kernel quantizes.

    BatchNorm folding follows Krishnamoorthi (2018, section 3.2): the kernel
    is scaled with the *moving* standard deviation, so the weights that are
    fake-quantized in training are the ones exported; while BatchNorm is not
    frozen, the output is corrected to batch statistics
    (`y = (z / c + b - mean_B) * gamma / sigma_B + beta` with `z` the
    quantized-kernel output and `c = gamma / sigma_moving`) and the moving
    statistics update as in BatchNormalization. Once BatchNorm is frozen the
    layer computes `z + beta + (b - mean) * c`, the exported graph. The
    convolution runs once per step.

    A `PrunedLayer` in place of the layer keeps pruning (pruning-preserving
    QAT): its masks multiply the raw kernels before BatchNorm folding and
    fake-quant, so a pruned weight is a zero int8 weight, and its schedule
    goes on updating the masks while the QAT model trains.

    Args:
        layer: the Conv1D/2D/3D, DepthwiseConv1D/2D, SeparableConv1D/2D,
            Conv1DTranspose/Conv2DTranspose, Dense or EinsumDense layer (a fresh copy; the layer's own activation is
            ignored), or a `PrunedLayer` wrapping one.
        batch_norm: the BatchNormalization layer folded in, or None.
        activation: `"linear"`, `"relu"` or `"relu6"`, fused into the op.
        per_channel: one weight scale per output channel (True) or per
            tensor.
        weight_bits: weight bit width.
        num_bits: activation bit width.
        ema_decay: decay of the activation range observers.

    Examples:
        >>> import numpy as np
        >>> conv = keras.layers.Conv2D(4, 3)
        >>> layer = QuantizedLinear(conv, keras.layers.BatchNormalization(),
        ...                         activation="relu")
        >>> y = layer(np.random.rand(2, 8, 8, 3).astype("float32"), training=True)
        >>> tuple(y.shape)
        (2, 6, 6, 4)
    """

    _sublayer_keys = ("layer", "batch_norm")

    def __init__(
        self,
        layer,
        batch_norm=None,
        activation="linear",
        per_channel=True,
        weight_bits=8,
        num_bits=8,
        ema_decay=0.99,
        **kwargs,
    ):
        kwargs.setdefault("name", layer.name)
        super().__init__(num_bits=num_bits, ema_decay=ema_decay, **kwargs)
        self.pruning = layer if isinstance(layer, PrunedLayer) else None
        if self.pruning is not None:
            layer = self.pruning.layer
        self.linear_op = linear_op_for(layer)
        if self.linear_op is None:
            raise ValueError(
                f"QuantizedLinear cannot wrap layer '{layer.name}' of class "
                f"{type(layer).__name__}: supported classes are Dense, "
                "Conv1D/2D/3D, DepthwiseConv1D/2D, SeparableConv1D/2D, "
                "Conv1DTranspose/Conv2DTranspose and EinsumDense."
            )
        self.linear_op = self.linear_op.for_layer(layer)
        check_fused_activation(layer.name, activation)
        self.layer = layer
        self.batch_norm = batch_norm
        self.activation = activation
        self.per_channel = per_channel
        self.weight_bits = weight_bits
        self.output_quantizer = self._activation_quantizer("output")
        # A transposed conv without bias exports its activation as an op of
        # its own: the tensor before it gets a fake-quant, as between the
        # two ops of a separable convolution.
        self.splits_activation = self.linear_op.splits_activation(
            layer, batch_norm, activation
        )
        self.intermediate_quantizer = (
            self._activation_quantizer("intermediate")
            if len(self.linear_op.kernel_names) > 1 or self.splits_activation
            else None
        )

    def build(self, input_shape):
        outer = self.pruning or self.layer
        if not outer.built:
            outer.build(input_shape)
        if self.batch_norm is not None and not self.batch_norm.built:
            build_replica_synced(
                self.batch_norm, self.layer.compute_output_shape(input_shape)
            )
        bias = self._layer_bias()
        if bias is not None and self.batch_norm is not None and self.batch_norm.center:
            # Batch statistics cancel the bias while BatchNorm trains, and
            # once it is frozen the bias only adds `bias * c` to what beta
            # adds: beta trains it, the optimizer gets no variable without
            # a gradient.
            bias.trainable = False
        self._build_quantization_state()

    def activation_quantizers(self):
        if self.intermediate_quantizer is None:
            return [self.output_quantizer]
        return [self.intermediate_quantizer, self.output_quantizer]

    # -- weights ---------------------------------------------------------

    def _bn_channel_scale(self):
        """`gamma / sqrt(moving_variance + epsilon)`, the fold factor."""
        return batch_norm_scale(self.batch_norm, self.batch_norm.moving_variance)

    def _float_kernels(self):
        """The kernels before quantization, folded with the moving BN stats."""
        # Values, not variables: jnp.where (in `call`) does not read variables.
        if self.pruning is not None:
            # Masked before folding: a pruned weight stays an int8 zero.
            kernels = self.pruning.masked_kernels()
        else:
            kernels = [
                ops.convert_to_tensor(getattr(self.layer, name))
                for name in self.linear_op.kernel_names
            ]
        if self.batch_norm is not None:
            index = self.linear_op.fold_index
            kernels[index] = self.linear_op.fold(
                self.layer, kernels[index], self._bn_channel_scale()
            )
        return kernels

    def _quantized_kernels(self, kernels):
        return [
            fake_quant_weight(
                kernel,
                self.linear_op.reduce_axes(index, len(kernel.shape), self.per_channel),
                self.weight_bits,
            )
            for index, kernel in enumerate(kernels)
        ]

    def folded_kernel_pairs(self):
        """Returns `(float, fake_quantized)` NumPy pairs, one per kernel.

        The float kernels are folded with the moving BatchNorm statistics,
        as they export; the difference within each pair is the weight
        quantization error (see `QuantizationMonitor`).
        """
        float_kernels = self._float_kernels()
        return [
            (ops.convert_to_numpy(k), ops.convert_to_numpy(q))
            for k, q in zip(float_kernels, self._quantized_kernels(float_kernels))
        ]

    def _layer_bias(self):
        return self.linear_op.bias(self.layer)

    def _folded_bias(self):
        """The bias after folding with the moving BN statistics (or None)."""
        bias = self._layer_bias()
        bn = self.batch_norm
        if bn is None:
            return bias
        shift = -bn.moving_mean if bias is None else bias - bn.moving_mean
        folded = shift * self._bn_channel_scale()
        if bn.center:
            folded = folded + bn.beta
        return folded

    def quantization_reduce_axes(self):
        """Per kernel, the axes that share one weight scale."""
        return [
            self.linear_op.reduce_axes(
                index, len(getattr(self.layer, name).shape), self.per_channel
            )
            for index, name in enumerate(self.linear_op.kernel_names)
        ]

    def export_constants(self):
        kernels = self._quantized_kernels(self._float_kernels())
        bias = self._folded_bias()
        return {
            "kernels": [ops.convert_to_numpy(k) for k in kernels],
            "bias": None if bias is None else self.linear_op.export_bias(
                ops.convert_to_numpy(bias), self.activation
            ),
        }

    # -- forward ---------------------------------------------------------

    def _add_channel_vector(self, x, vector):
        return self.linear_op.add_channel_vector(self.layer, x, vector)

    def _scale_channels(self, x, vector):
        return x * channel_vector(vector, len(x.shape), self.linear_op.channel_axis(self.layer))

    def call(self, inputs, training=False):
        if self.pruning is not None and training and not is_calibrating():
            self.pruning.update_masks()
        quantize, bn_frozen, ranges_frozen = self._phase(training)

        def quantize_intermediate(x):
            return self._quantize_activation(
                self.intermediate_quantizer, x, quantize, ranges_frozen, training
            )

        if is_exporting():
            constants = self._export_constants
            kernels = [ops.convert_to_tensor(k) for k in constants["kernels"]]
            bias = constants["bias"]
            outputs = self.linear_op.apply(
                self.layer, inputs, kernels, quantize_intermediate
            )
            if bias is not None:
                outputs = self._add_channel_vector(outputs, ops.convert_to_tensor(bias))
        else:
            float_kernels = self._float_kernels()
            kernels = [
                select(quantize, q, k)
                for q, k in zip(self._quantized_kernels(float_kernels), float_kernels)
            ]
            outputs = self.linear_op.apply(
                self.layer, inputs, kernels, quantize_intermediate
            )
            bias = self._folded_bias()
            if self.batch_norm is not None and training and bn_frozen is not True:
                outputs = self._batch_norm_train(outputs, bias, bn_frozen)
            elif bias is not None:
                outputs = self._add_channel_vector(outputs, bias)
        if self.splits_activation:
            outputs = quantize_intermediate(outputs)
        outputs = self._finish(outputs, quantize, ranges_frozen, training, self.activation)
        return self.linear_op.restore_rank(self.layer, outputs)

    def _batch_norm_train(self, outputs, folded_bias, bn_frozen):
        """Corrects the folded output to batch statistics; updates the BN.

        With `z` the quantized-kernel output and `c = gamma / sigma_moving`,
        the unfolded output is `z / c + b`: its batch moments are
        `mean(z) / c + b` and `var(z) / c^2`, and the corrected output
        `(z / c + b - mean_B) * gamma / sigma_B + beta` is one per-channel
        multiply-add on `z` (the conv bias cancels). Frozen, the
        multiply-add is `z * 1 + folded_bias`: the phase selects between
        per-channel vectors, never between whole tensors.
        """
        bn = self.batch_norm
        axis = self.linear_op.channel_axis(self.layer) % len(outputs.shape)
        reduce_axes = [i for i in range(len(outputs.shape)) if i != axis]
        fold_scale = _safe_divisor(self._bn_channel_scale())
        z_mean, z_variance = ops.moments(outputs, axes=reduce_axes)
        mean = z_mean / fold_scale
        variance = z_variance / ops.square(fold_scale)
        bias = self._layer_bias()
        update_moving_statistics(
            bn, mean if bias is None else mean + bias, variance, bn_frozen
        )
        batch_scale, shift = batch_norm_affine(bn, mean, variance)
        frozen_shift = ops.zeros_like(shift) if folded_bias is None else folded_bias
        multiplier = select(bn_frozen, 1.0, batch_scale / fold_scale)
        shift = select(bn_frozen, frozen_shift, shift)
        return self._add_channel_vector(self._scale_channels(outputs, multiplier), shift)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "activation": self.activation,
                "per_channel": self.per_channel,
                "weight_bits": self.weight_bits,
            }
        )
        if self.pruning is not None:
            config["layer"] = keras.saving.serialize_keras_object(self.pruning)
        return config
