"""GELU: one int8 GELU op with an output fake-quant, as the converter's PTQ.

Measured here (TF 2.21): the converter lowers Keras' gelu, exact
(`approximate=False`, erf) or tanh-approximated, as a layer, an activation
argument or a `keras.ops` call, to the builtin GELU op (not an erf/tanh
chain), int8 in PTQ; the QAT export gives it the same op and one output
scale of its own.
"""

import keras
import numpy as np
import pytest

import qat_plugin
from tests.conftest import assert_parity, qat_fit

L = keras.layers

FORMS = {
    "Activation('gelu')": lambda x: L.Activation("gelu")(L.Dense(4)(x)),
    "Dense(activation='gelu')": lambda x: L.Dense(4, activation="gelu")(x),
    "ops.gelu approximate": lambda x: keras.ops.gelu(L.Dense(4)(x)),
    "ops.gelu exact": lambda x: keras.ops.gelu(L.Dense(4)(x), approximate=False),
    "activations.gelu approximate": lambda x: keras.activations.gelu(
        L.Dense(4)(x), approximate=True),
}


@pytest.mark.tf_only
@pytest.mark.parametrize("form", list(FORMS))
def test_gelu_is_one_int8_gelu_op_as_in_ptq(form):
    inputs = keras.Input((6,))
    model = keras.Model(inputs, FORMS[form](L.Dense(6)(inputs)))
    x = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
    y = np.random.default_rng(1).integers(0, 4, 64)
    ptq = qat_plugin.inspect_tflite(
        qat_plugin.export_tflite(model, mode="int8", representative_data=x)
    )
    qat = qat_fit(model, x, y)
    tflite = qat_plugin.export_tflite(qat)
    report = qat_plugin.inspect_tflite(tflite)
    assert ptq.is_fully_int8 and report.is_fully_int8, report.summary()
    assert [op.name for op in report.ops] == [op.name for op in ptq.ops]
    assert report.op_counts["GELU"] == 1
    gelu = next(op for op in report.ops if op.name == "GELU")
    assert gelu.outputs[0].scales != gelu.inputs[0].scales  # its own output scale
    # The int8 FULLY_CONNECTED before GELU may round one step apart from the
    # fake-quant; GELU's slope (up to ~1.13) carries that on and its LUT
    # rounds again: measured up to 3 output steps over model seeds (2 with
    # the reference kernels), never more.
    assert_parity(qat, tflite, x, max_steps=3.0)
