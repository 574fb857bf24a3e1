"""One time step of LSTM, GRU and SimpleRNN, written as the int8 ops it exports to.

Each step is a chain of int8 TFLite ops: FULLY_CONNECTED (input and
recurrent projections, per-channel int8 weights), ADD, SUB, MUL, LOGISTIC,
TANH and SPLIT (which keeps its input's scale). A step function receives
`q(role, x)`, which fake-quantizes `x` as the tensor `role` of the step (one
observed range per role, shared by every step; the gate activations have
the kernels' fixed ranges), and `fc(x, kernel, bias)`, the projection.
The first step starts from zero states, so it has no recurrent projection
(the products with a zero state vanish instead of becoming ops).

The step functions are `keras.ops` only: the same code trains on every
backend and traces into the graph the converter reads.
"""

from keras import ops

def roles(kind, reset_after=True, activation="tanh"):
    """The tensors a step of `kind` quantizes with an observed range.

    The gate activations' outputs ("sigmoid", "tanh") have the fixed
    ranges of LOGISTIC and TANH instead.

    Examples:
        >>> roles("simple_rnn", activation="relu")
        ('input', 'recurrent', 'hidden')
    """
    if kind == "lstm":
        return ("input", "recurrent", "gates", "forget_cell", "input_cell",
                "cell", "hidden")
    if kind == "gru":
        return ("input", "recurrent", "update_gate", "reset_gate", "reset_hidden",
                "candidate", "delta", "update", "hidden") + (
                    () if reset_after else ("reset_state",))
    # A tanh SimpleRNN's hidden state is TANH's output (fixed range).
    return ("input", "recurrent") + (("hidden",) if activation == "relu" else ("gates",))


def _parts(z, count, used=None):
    """`z` split into `count` equal parts along its last axis.

    With `used` (the indices needed), the parts not used are left out:
    STRIDED_SLICE each used part, as the converter leaves a SPLIT with an
    unused output in float.
    """
    if used is None:
        return ops.split(z, count, axis=-1)
    width = z.shape[-1] // count
    return [z[:, i * width:(i + 1) * width] if i in used else None
            for i in range(count)]


def lstm_step(x, state, first, weights, q, fc):
    """One LSTM step (gate order i, f, c, o); `state` is `(h, c)` or None.

    Examples:
        >>> import numpy as np
        >>> w = {"kernel": np.ones((2, 4), "float32"), "bias": None,
        ...      "recurrent_kernel": np.ones((1, 4), "float32")}
        >>> fc = lambda x, k, b: ops.matmul(x, k)
        >>> h, (_, c) = lstm_step(np.ones((1, 2), "float32"), None, True, w,
        ...                       lambda role, v: v, fc)
        >>> round(float(h[0, 0]), 4)
        0.6083
    """
    z = q("input", fc(x, weights["kernel"], weights["bias"]))
    if not first:
        h, c = state
        z = q("gates", z + q("recurrent", fc(h, weights["recurrent_kernel"], None)))
    z_i, z_f, z_c, z_o = _parts(z, 4, (0, 2, 3) if first else None)
    i = q("sigmoid", ops.sigmoid(z_i))
    g = q("tanh", ops.tanh(z_c))
    o = q("sigmoid", ops.sigmoid(z_o))
    if first:
        c = q("input_cell", i * g)
    else:
        f = q("sigmoid", ops.sigmoid(z_f))
        c = q("cell", q("forget_cell", f * c) + q("input_cell", i * g))
    h = q("hidden", o * q("tanh", ops.tanh(c)))
    return h, (h, c)


def gru_step(x, state, first, weights, q, fc, reset_after=True):
    """One GRU step (gate order z, r, h); `state` is `h` or None.

    `h = hh + z * (h_prev - hh)`, which is Keras' `z * h_prev + (1 - z) * hh`
    in three int8 ops (SUB, MUL, ADD); the first step's `h_prev` is zero:
    `hh - z * hh`.

    Examples:
        >>> import numpy as np
        >>> w = {"kernel": np.zeros((2, 3), "float32"), "bias": None,
        ...      "recurrent_kernel": np.zeros((1, 3), "float32"),
        ...      "recurrent_bias": None}
        >>> fc = lambda x, k, b: ops.matmul(x, k)
        >>> h, _ = gru_step(np.ones((1, 2), "float32"), None, True, w,
        ...                 lambda role, v: v, fc)
        >>> float(h[0, 0])
        0.0
    """
    units = weights["recurrent_kernel"].shape[0]
    bias, recurrent_bias = weights["bias"], weights.get("recurrent_bias")
    if first and recurrent_bias is not None:
        # h_prev = 0: the recurrent projection is its bias; the z and r parts
        # fold into the input projection's bias, the h part is r * bias.
        zeros = ops.zeros_like(recurrent_bias[2 * units:])
        folded = ops.concatenate([recurrent_bias[: 2 * units], zeros])
        bias = folded if bias is None else bias + folded
    z_x = q("input", fc(x, weights["kernel"], bias))
    x_z, x_r, x_h = _parts(
        z_x, 3, (0, 2) if first and recurrent_bias is None else None)
    if first:
        z = q("sigmoid", ops.sigmoid(x_z))
        if recurrent_bias is not None:
            r = q("sigmoid", ops.sigmoid(x_r))
            x_h = q("candidate", x_h + q("reset_hidden", r * recurrent_bias[2 * units:]))
        hh = q("tanh", ops.tanh(x_h))
        h = q("hidden", hh - q("update", z * hh))
        return h, h
    h_prev = state
    kernel = weights["recurrent_kernel"]
    if reset_after:
        z_h = q("recurrent", fc(h_prev, kernel, recurrent_bias))
        h_z, h_r, h_h = ops.split(z_h, 3, axis=-1)
    else:
        h_z, h_r = ops.split(
            q("recurrent", fc(h_prev, kernel[:, : 2 * units], None)), 2, axis=-1
        )
    z = q("sigmoid", ops.sigmoid(q("update_gate", x_z + h_z)))
    r = q("sigmoid", ops.sigmoid(q("reset_gate", x_r + h_r)))
    if reset_after:
        reset = q("reset_hidden", r * h_h)
    else:
        reset = q("reset_hidden", fc(q("reset_state", r * h_prev),
                                     kernel[:, 2 * units:], None))
    hh = q("tanh", ops.tanh(q("candidate", x_h + reset)))
    h = q("hidden", hh + q("update", z * q("delta", h_prev - hh)))
    return h, h


def simple_rnn_step(x, state, first, weights, q, fc, activation="tanh"):
    """One SimpleRNN step, `activation` tanh or relu; `state` is `h` or None.

    A ReLU fuses into the op before it (FULLY_CONNECTED or ADD), so it has
    no fake-quant of its own.

    Examples:
        >>> import numpy as np
        >>> w = {"kernel": np.ones((2, 1), "float32"), "bias": None,
        ...      "recurrent_kernel": np.ones((1, 1), "float32")}
        >>> fc = lambda x, k, b: ops.matmul(x, k)
        >>> h, _ = simple_rnn_step(np.ones((1, 2), "float32"), None, True, w,
        ...                        lambda role, v: v, fc, activation="relu")
        >>> float(h[0, 0])
        2.0
    """
    z = fc(x, weights["kernel"], weights["bias"])
    if first:
        h = (q("hidden", ops.relu(z)) if activation == "relu"
             else q("tanh", ops.tanh(q("input", z))))
        return h, h
    z = q("input", z) + q("recurrent", fc(state, weights["recurrent_kernel"], None))
    h = (q("hidden", ops.relu(z)) if activation == "relu"
         else q("tanh", ops.tanh(q("gates", z))))
    return h, h


STEPS = {"lstm": lstm_step, "gru": gru_step, "simple_rnn": simple_rnn_step}
