"""PTQ baselines of float recurrent models: a clone with unrolled RNN layers.

The converter cannot lower a Keras 3 LSTM, GRU or SimpleRNN that loops over
time (`'tf.TensorListReserve' op requires element_shape to be static`; with
Select TF ops it fails again at calibration). The same layers with
`unroll=True` trace into one op chain per time step, which it converts to
full int8 (measured, TF 2.21: LSTM, GRU, Bidirectional LSTM). Models without
recurrent layers are converted as they are.
"""

import keras

from qat_plugin.errors import UnsupportedLayerError

_RECURRENT = (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN)


def _recurrent_layers(model):
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(_recurrent_layers(layer))
        elif isinstance(layer, _RECURRENT + (keras.layers.Bidirectional,)):
            found.append(layer)
    return found


def _unrolled_config(config):
    return {**config, "config": {**config["config"], "unroll": True}}


def _unrolled_layer(layer):
    if isinstance(layer, keras.layers.Bidirectional):
        config = layer.get_config()
        config["layer"] = _unrolled_config(config["layer"])
        if config.get("backward_layer") is not None:
            config["backward_layer"] = _unrolled_config(config["backward_layer"])
    elif isinstance(layer, _RECURRENT):
        config = {**layer.get_config(), "unroll": True}
    else:
        return layer  # Shared with the original: same weights.
    # A masked layer's input is [sequence, mask].
    shape = keras.tree.flatten(layer.input)[0].shape
    steps = shape[1]
    if steps is None:
        raise UnsupportedLayerError(
            f"Layer '{layer.name}' ({type(layer).__name__}) has an input with no "
            "fixed sequence length (time dimension None): the converter's PTQ "
            "of a Keras 3 RNN needs it unrolled, which needs a fixed length. "
            "Give the model's Input a fixed sequence length, e.g. "
            "keras.Input((steps, features))."
        )
    clone = type(layer).from_config(config)
    clone.build(shape)
    clone.set_weights(layer.get_weights())
    return clone


def with_unrolled_rnns(model):
    """Returns `model`, or a clone whose recurrent layers have `unroll=True`.

    The clone computes the same outputs with the same weights; the
    converter's PTQ lowers it where it cannot lower the looping layers.

    Examples:
        >>> import keras
        >>> model = keras.Sequential([keras.Input((5, 3)), keras.layers.LSTM(2)])
        >>> with_unrolled_rnns(model).layers[0].unroll
        True
        >>> dense = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> with_unrolled_rnns(dense) is dense
        True
    """
    if not _recurrent_layers(model):
        return model
    return keras.models.clone_model(
        model, clone_function=_unrolled_layer, recursive=True
    )
