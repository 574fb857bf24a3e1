"""LSTM, GRU, SimpleRNN and Bidirectional, unrolled into int8 ops.

`QuantizedRecurrent` runs a copy of the float recurrent layer's weights
through the static time steps of its input, one Python loop iteration per
step, each step the chain of int8 ops of `recurrent_cells`. Every tensor the
int8 graph quantizes gets a fake-quant: one observed range per role (the
input and recurrent projections, each ADD and MUL, the cell and hidden
states), shared by all steps; the gate activations have LOGISTIC's and
TANH's fixed ranges. Kernels are snapped to their per-output-column int8
grid in training and exported as constants on that grid, as Dense is.

A mask (from `keras.layers.Masking` or `Embedding(mask_zero=True)`)
selects, at each step, between the new and the previous states
(`ops.where`: SELECT_V2, which keeps the scale its inputs share); a masked
step's output is the previous output, or zeros where the layer has
`zero_output_for_mask` (Bidirectional sets it with `return_sequences`).
"""

import keras
from keras import ops, tree

from qat_plugin.errors import UnsupportedLayerError
from qat_plugin.layers.base import QuantizedLayer
from qat_plugin.layers.modes import is_exporting
from qat_plugin.layers.recurrent_cells import STEPS, roles
from qat_plugin.quantizers import (
    FIXED_RANGES,
    ActivationQuantizer,
    fake_quant_weight,
    select,
)

_KINDS = {keras.layers.LSTM: "lstm", keras.layers.GRU: "gru",
          keras.layers.SimpleRNN: "simple_rnn"}
_KERNELS = ("kernel", "recurrent_kernel")


def _refuse(layer, problem, fix):
    raise UnsupportedLayerError(
        f"Layer '{layer.name}' ({type(layer).__name__}) {problem}; {fix}"
    )


def _activation(function):
    return keras.activations.serialize(function) if function is not None else "linear"


def check_recurrent(layer):
    """Raises `UnsupportedLayerError` for a recurrent layer the int8 lowering lacks.

    Examples:
        >>> try:
        ...     check_recurrent(keras.layers.LSTM(4, stateful=True, name="rnn"))
        ... except UnsupportedLayerError as error:
        ...     print(str(error)[:39])
        Layer 'rnn' (LSTM) is stateful=True, wh
    """
    if isinstance(layer, keras.layers.Bidirectional):
        if layer.merge_mode != "concat":
            _refuse(layer, f"merges with merge_mode={layer.merge_mode!r}",
                    "only merge_mode='concat' (the default) exports as int8.")
        if layer.return_state:
            _refuse(layer, "returns its states", "use return_state=False.")
        for inner in (layer.forward_layer, layer.backward_layer):
            check_recurrent(inner)
        return
    if type(layer) not in _KINDS:
        _refuse(layer, "is not an LSTM, GRU or SimpleRNN",
                "wrap one of those (Bidirectional) or keep it in float with skip=.")
    if layer.stateful:
        _refuse(layer, "is stateful=True, which keeps state across batches; the "
                "int8 export is one unrolled, stateless call",
                "build the model with stateful=False.")
    if layer.return_state:
        _refuse(layer, "returns its states", "use return_state=False.")
    kind = _KINDS[type(layer)]
    cell = layer.cell
    if kind == "simple_rnn":
        if _activation(cell.activation) not in ("tanh", "relu"):
            _refuse(layer, f"has activation {_activation(cell.activation)!r}",
                    "use 'tanh' or 'relu' (TANH, or a ReLU fused into the op).")
        return
    if _activation(cell.activation) != "tanh" or (
        _activation(cell.recurrent_activation) != "sigmoid"
    ):
        _refuse(layer, f"has activation {_activation(cell.activation)!r} and "
                f"recurrent_activation {_activation(cell.recurrent_activation)!r}",
                "use the defaults, activation='tanh' and "
                "recurrent_activation='sigmoid' (the int8 TANH and LOGISTIC).")


def _check_input_shape(layer, input_shape):
    if len(input_shape) != 3:
        _refuse(layer, f"takes an input of shape {tuple(input_shape)}",
                "give it one input of shape (batch, time, features).")
    if input_shape[1] is None:
        _refuse(layer, "has an input with no fixed sequence length (time "
                "dimension None); its int8 export unrolls the time steps",
                "give the model's Input a fixed sequence length, e.g. "
                "keras.Input((steps, features)).")


def _directions(layer):
    """`(direction name, recurrent layer)` pairs; one unless Bidirectional."""
    if isinstance(layer, keras.layers.Bidirectional):
        return [("forward", layer.forward_layer), ("backward", layer.backward_layer)]
    return [("", layer)]


def _weights(rnn, kernels):
    """The step functions' weights: quantized `kernels`, float biases."""
    cell = rnn.cell
    bias = ops.convert_to_tensor(cell.bias) if cell.use_bias else None
    weights = dict(zip(_KERNELS, kernels), bias=bias)
    if isinstance(rnn, keras.layers.GRU):
        weights["recurrent_bias"] = None
        if bias is not None and cell.reset_after:
            weights["bias"], weights["recurrent_bias"] = bias[0], bias[1]
    return weights


def _options(rnn):
    """The step function's options for `rnn`."""
    if isinstance(rnn, keras.layers.GRU):
        return {"reset_after": rnn.cell.reset_after}
    if isinstance(rnn, keras.layers.SimpleRNN):
        return {"activation": _activation(rnn.cell.activation)}
    return {}


def _fc(x, kernel, bias):
    """FULLY_CONNECTED: `x @ kernel + bias`."""
    y = ops.matmul(x, kernel)
    return y if bias is None else y + bias


def _masked(keep, h, new_state, state, zero_output):
    """A step's output and states under its mask `keep` ([batch, 1], bool).

    A masked step keeps the previous states (zeros before the first step)
    and outputs the previous hidden state, or zeros with `zero_output`.
    """
    # A scalar 0.0, not ZEROS_LIKE (a float op): the converter quantizes it
    # to the scale SELECT_V2 shares.
    if state is None:
        state = tree.map_structure(lambda _: 0.0, new_state)
    state = tree.map_structure(lambda n, p: ops.where(keep, n, p), new_state, state)
    if zero_output:
        return ops.where(keep, h, 0.0), state
    return tree.flatten(state)[0], state


@keras.saving.register_keras_serializable(package="qat_plugin")
class QuantizedRecurrent(QuantizedLayer):
    """Runs an LSTM, GRU, SimpleRNN or Bidirectional of them as int8 ops compute it.

    The time steps are unrolled for the input's fixed sequence length. The
    layer outputs the last hidden state, or with `return_sequences` every
    step's (PACK, which keeps the hidden state's scale); a Bidirectional
    concatenates the two directions, whose hidden states share one range
    (CONCATENATION keeps its inputs' scale). Dropout and recurrent dropout
    are not applied (the int8 model has none).

    Args:
        layer: the float recurrent layer (a fresh copy; its weights follow).
        weight_bits: weight bit width.
        num_bits: activation bit width.
        ema_decay: decay of the range observers.

    Examples:
        >>> import numpy as np
        >>> layer = QuantizedRecurrent(keras.layers.LSTM(3))
        >>> tuple(layer(np.ones((2, 5, 4), "float32"), training=True).shape)
        (2, 3)
    """

    _sublayer_keys = ("layer",)

    def __init__(self, layer, weight_bits=8, num_bits=8, ema_decay=0.99, **kwargs):
        kwargs.setdefault("name", layer.name)
        super().__init__(num_bits=num_bits, ema_decay=ema_decay, **kwargs)
        self.supports_masking = True
        check_recurrent(layer)
        self.layer = layer
        self.weight_bits = weight_bits
        self.fixed_quantizers = {
            name: self._activation_quantizer(name, FIXED_RANGES[name])
            for name in ("sigmoid", "tanh")
        }
        # One hidden-state range for both directions: CONCATENATION keeps it.
        # It is the output's range: it joins the output's range group (a
        # CONCATENATION after the layer, whose scale reaches every step's
        # SELECT_V2 and PACK).
        hidden = ActivationQuantizer("hidden", num_bits=self.num_bits,
                                     ema_decay=self.ema_decay,
                                     group=self.range_group)
        self.quantizers = {}
        for direction, rnn in _directions(layer):
            prefix = f"{direction}_" if direction else ""
            for role in roles(_KINDS[type(rnn)], **_options(rnn)):
                self.quantizers[direction, role] = (
                    hidden if role == "hidden"
                    else self._activation_quantizer(prefix + role)
                )

    def activation_quantizers(self):
        return list({id(q): q for q in self.quantizers.values()}.values())

    def build(self, input_shape):
        _check_input_shape(self.layer, input_shape)
        if not self.layer.built:
            self.layer.build(input_shape)
        self._build_quantization_state()

    # -- weights ---------------------------------------------------------

    def _float_kernels(self, rnn):
        return [ops.convert_to_tensor(getattr(rnn.cell, name)) for name in _KERNELS]

    def _quantized_kernels(self, rnn):
        # One scale per output column of the [in, units * gates] kernels.
        return [fake_quant_weight(k, (0,), self.weight_bits)
                for k in self._float_kernels(rnn)]

    def export_constants(self):
        return {
            direction: [ops.convert_to_numpy(k) for k in self._quantized_kernels(rnn)]
            for direction, rnn in _directions(self.layer)
        }

    # -- forward ---------------------------------------------------------

    def _run(self, rnn, direction, inputs, masks, quantize, ranges_frozen,
             training):
        """The hidden states of one direction, in time order."""
        kind = _KINDS[type(rnn)]
        if is_exporting():
            kernels = [ops.convert_to_tensor(k)
                       for k in self._export_constants[direction]]
        else:
            kernels = [select(quantize, q, k) for q, k in
                       zip(self._quantized_kernels(rnn), self._float_kernels(rnn))]
        weights = _weights(rnn, kernels)
        options = _options(rnn)

        def q(role, x, first=False):
            if first and masks is not None and role == "input_cell":
                # A masked first step's cell state meets the later ones'
                # in SELECT_V2, which keeps one scale: the MUL gets the cell's.
                role = "cell"
            quantizer = (self.fixed_quantizers.get(role)
                         or self.quantizers[direction, role])
            return self._quantize_activation(
                quantizer, x, quantize, ranges_frozen, training
            )

        # One UNPACK for the whole sequence, as the converter's PTQ of the
        # unrolled layer has (a slice per step is one op per step more).
        frames = ops.unstack(inputs, axis=1)
        steps = range(len(frames))
        if rnn.go_backwards:
            steps = reversed(steps)
        outputs, state = {}, None
        for index, t in enumerate(steps):
            h, new_state = STEPS[kind](
                frames[t], state, index == 0, weights,
                lambda role, x: q(role, x, index == 0), _fc, **options)
            if masks is None:
                state = new_state
            else:
                h, state = _masked(masks[t], h, new_state, state,
                                   getattr(rnn, "zero_output_for_mask", False))
            outputs[t] = h
        return [outputs[t] for t in sorted(outputs)], rnn.go_backwards

    def call(self, inputs, mask=None, training=False):
        quantize, _, ranges_frozen = self._phase(training)
        # One [batch, 1] slice of the mask per step, shared by the directions.
        masks = None if mask is None else [
            mask[:, t:t + 1] for t in range(inputs.shape[1])]
        merged = []
        for direction, rnn in _directions(self.layer):
            hidden, backwards = self._run(rnn, direction, inputs, masks,
                                          quantize, ranges_frozen, training)
            if not rnn.return_sequences:
                merged.append(hidden[0] if backwards else hidden[-1])
            elif backwards and direction != "backward":
                # A go_backwards layer returns its steps in processing order.
                merged.append(ops.stack(hidden[::-1], axis=1))
            else:
                merged.append(ops.stack(hidden, axis=1))
        self._advance(training)
        return merged[0] if len(merged) == 1 else ops.concatenate(merged, axis=-1)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

    def get_config(self):
        config = super().get_config()
        config["weight_bits"] = self.weight_bits
        return config
