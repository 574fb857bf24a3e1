"""Runs .tflite models in the LiteRT interpreter, int8 I/O handled."""

import os

import numpy as np

from qat_plugin.errors import ModelFileError


def _interpreter_module():
    from ai_edge_litert import interpreter

    return interpreter


# A TFLite flatbuffer's file identifier, at bytes 4 to 8 (after the root offset).
TFLITE_IDENTIFIER = b"TFL3"
# How an error names a model given as bytes.
GIVEN_BYTES = "the bytes given"


def model_source(model):
    """How errors name `model`: its path, or "the bytes given" for bytes.

    Examples:
        >>> from qat_plugin.tflite.interpreter import model_source
        >>> model_source("out/model.tflite"), model_source(b"TFL3")
        ("'out/model.tflite'", 'the bytes given')
    """
    if isinstance(model, (str, os.PathLike)):
        return repr(os.fspath(model))
    return GIVEN_BYTES


def check_model_bytes(data, source=GIVEN_BYTES):
    """Raises `ModelFileError` unless `data` starts like a .tflite flatbuffer.

    A .tflite file is a flatbuffer whose bytes 4 to 8 are the identifier
    `TFL3`; an empty file, or one of another format, fails here with its
    `source` named, before LiteRT's own messages (which name no file).

    Examples:
        >>> from qat_plugin.tflite.interpreter import check_model_bytes
        >>> check_model_bytes(b"PK.. a zip archive", "'model.tflite'")
        Traceback (most recent call last):
        ...
        qat_plugin.errors.ModelFileError: No .tflite model in 'model.tflite': its 18 bytes start ...
    """
    expected = (
        "expected a TFLite flatbuffer (the TFLite file identifier b'TFL3' at "
        "bytes 4 to 8), as export_tflite or the TFLite converter writes it"
    )
    if not data:
        raise ModelFileError(
            f"No .tflite model in {source}: it is empty (0 bytes); {expected}."
        )
    if bytes(data[4:8]) != TFLITE_IDENTIFIER:
        raise ModelFileError(
            f"No .tflite model in {source}: its {len(data)} bytes start "
            f"{bytes(data[:8])!r}; {expected}."
        )


def load_model_bytes(model):
    """Returns .tflite bytes from bytes or a path, checked to be a TFLite flatbuffer.

    Raises:
        FileNotFoundError: no file at the path.
        ModelFileError: the file or bytes are empty or not a TFLite
            flatbuffer (see `check_model_bytes`).

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.tflite.interpreter import load_model_bytes
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> load_model_bytes(bytearray(qat_plugin.export_tflite(model, mode="float")))[4:8]
        b'TFL3'
        >>> load_model_bytes("missing.tflite")
        Traceback (most recent call last):
        ...
        FileNotFoundError: No .tflite file at missing.tflite.
        >>> load_model_bytes(b"")
        Traceback (most recent call last):
        ...
        qat_plugin.errors.ModelFileError: No .tflite model in the bytes given: it is empty ...
    """
    if isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
    elif isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.exists(path):
            raise FileNotFoundError(f"No .tflite file at {path}.")
        if os.path.isdir(path):
            raise ModelFileError(
                f"{path!r} is a folder: give the path of a .tflite file."
            )
        with open(path, "rb") as f:
            data = f.read()
    else:
        raise TypeError(
            f"Expected .tflite bytes or a path to a .tflite file, got {type(model).__name__}."
        )
    check_model_bytes(data, model_source(model))
    return data


def make_interpreter(model, num_threads=None, use_xnnpack=True,
                     preserve_all_tensors=False, *, source=None):
    """Returns a LiteRT `Interpreter` for `model` (bytes or path).

    With `use_xnnpack=False` the default XNNPACK delegate is left out, so
    that the op list shows the model's own ops instead of one DELEGATE node.
    With `preserve_all_tensors=True` intermediate tensors stay readable after
    `invoke()` (for layer-wise error reports; costs memory). A file LiteRT
    cannot read (empty, truncated, not a flatbuffer) is a `ModelFileError`
    naming `source` (default: the path, or "the bytes given").

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.tflite.interpreter import make_interpreter
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> data = qat_plugin.export_tflite(model, mode="float")
        >>> make_interpreter(data).get_input_details()[0]["shape"].tolist()
        [1, 4]
        >>> make_interpreter(data[: len(data) // 2])
        Traceback (most recent call last):
        ...
        qat_plugin.errors.ModelFileError: LiteRT cannot read the bytes given ...
    """
    interpreter = _interpreter_module()
    source = source or model_source(model)
    if isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
        check_model_bytes(data, source)
    else:
        data = load_model_bytes(model)
    resolver = (
        interpreter.OpResolverType.AUTO
        if use_xnnpack
        else interpreter.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    try:
        return interpreter.Interpreter(
            model_content=data,
            num_threads=num_threads,
            experimental_op_resolver_type=resolver,
            experimental_preserve_all_tensors=preserve_all_tensors,
        )
    except ValueError as error:
        raise ModelFileError(
            f"LiteRT cannot read {source} ({len(data)} bytes) as a .tflite "
            f"model: {error}. Expected a complete TFLite flatbuffer as "
            "export_tflite writes it; a truncated or corrupt file must be "
            "exported again."
        ) from error


def quantize_array(x, detail):
    """Quantizes float `x` to the input tensor's integer type.

    Integer `x`, or a float input tensor, is only cast to the tensor's type.

    Examples:
        >>> import numpy as np
        >>> from qat_plugin.tflite.interpreter import quantize_array
        >>> detail = {"dtype": np.int8, "quantization": (0.5, 0)}
        >>> quantize_array([0.4, 1.0, 100.0], detail).tolist()
        [1, 2, 127]
    """
    dtype = detail["dtype"]
    if not np.issubdtype(dtype, np.integer) or np.issubdtype(
        np.asarray(x).dtype, np.integer
    ):
        return np.asarray(x, dtype=dtype)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    q = np.round(np.asarray(x, np.float32) / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize_array(q, detail):
    """Dequantizes an integer output tensor to float32.

    Examples:
        >>> import numpy as np
        >>> from qat_plugin.tflite.interpreter import dequantize_array
        >>> detail = {"dtype": np.int8, "quantization": (0.5, 0)}
        >>> dequantize_array(np.array([2, -4], np.int8), detail).tolist()
        [1.0, -2.0]
    """
    scale, zero_point = detail["quantization"]
    if not np.issubdtype(detail["dtype"], np.integer) or scale == 0:
        return np.asarray(q)
    return (q.astype(np.float32) - zero_point) * scale


def _input_key(name, inputs):
    """The key of dict `inputs` that feeds the file's input tensor `name`.

    `export_tflite` names inputs by the Keras keys; files from a SavedModel
    signature name them `serving_default_<key>:0`.
    """
    if name in inputs:
        return name
    match = [k for k in inputs if name.endswith(f"_{k}:0") or name.startswith(f"{k}:")]
    if len(match) != 1:
        raise KeyError(
            f"The model's input '{name}' matches none of the given keys "
            f"{sorted(inputs)}: pass a dict keyed by the input names, or a "
            "list in the model's input order."
        )
    return match[0]


def _shown(shape):
    return "(" + ", ".join("batch" if i == 0 else str(d) for i, d in enumerate(shape)) + ")"


def input_shape_for(detail, array):
    """The shape to run input `detail` with for `array`, or a `ValueError` naming it.

    The batch axis and the sizes the file leaves dynamic (-1 in its shape
    signature) take the array's sizes; every other size must equal it.
    Integer inputs without quantization (token ids) refuse non-integral
    floats rather than truncate them.

    Examples:
        >>> import numpy as np
        >>> from qat_plugin.tflite.interpreter import input_shape_for
        >>> detail = {"name": "tokens", "shape": np.array([1, 12]), "dtype": np.int32,
        ...           "shape_signature": np.array([-1, 12]), "quantization": (0.0, 0)}
        >>> input_shape_for(detail, np.zeros((8, 12), "int32"))
        [8, 12]
        >>> input_shape_for(detail, np.zeros((8, 10), "int32"))
        Traceback (most recent call last):
        ...
        ValueError: Input 'tokens' of the .tflite model has the fixed shape (batch, 12); ...
    """
    signature = [int(d) for d in detail.get("shape_signature", detail["shape"])]
    fixed = [int(d) for d in detail["shape"]]
    given = tuple(np.shape(array))
    if len(given) != len(fixed) or any(
        s != -1 and s != g for s, g in list(zip(signature, given))[1:]
    ):
        wanted = _shown([-1] + [f if s != -1 else "any" for s, f in zip(signature[1:], fixed[1:])])
        raise ValueError(
            f"Input '{detail['name']}' of the .tflite model has the fixed shape "
            f"{wanted}; the data given for it has shape {given}. Give a batch "
            "of samples of that shape (pad or crop sequences, resize images), "
            "or export the model again with export_tflite(..., "
            "input_shape=...) for another size."
        )
    array = np.asarray(array)
    if (np.issubdtype(detail["dtype"], np.integer) and detail["quantization"][0] == 0
            and array.dtype.kind == "f" and not np.all(np.round(array) == array)):
        raise ValueError(
            f"Input '{detail['name']}' of the .tflite model is "
            f"{np.dtype(detail['dtype']).name} (e.g. token ids); the data given "
            "has non-integral floats: cast it to integers first."
        )
    return [given[0]] + [g if s == -1 else s for s, g in zip(signature[1:], given[1:])]


class TFLiteModel:
    """A .tflite model in the LiteRT interpreter, called like `model.predict`.

    Float inputs are quantized with the input tensor's scale and zero point
    and integer outputs dequantized, so the results compare directly with
    the Keras model's. Batches run in one invoke when the model's batch
    dimension is dynamic, one sample at a time otherwise. Each input must
    have the shape the file fixed (`export_tflite(..., input_shape=...)`),
    batch axis aside; a `ValueError` names the input that does not.

    Args:
        model: .tflite bytes or a path.
        num_threads: interpreter threads (None: the runtime's default).
        use_xnnpack: use the default XNNPACK delegate.
        preserve_all_tensors: keep intermediate tensors readable after
            each invoke.

    Examples:
        >>> import keras, numpy as np, qat_plugin
        >>> from qat_plugin.tflite.interpreter import TFLiteModel
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> runner = TFLiteModel(qat_plugin.export_tflite(model, mode="float"))
        >>> runner.predict(np.ones((3, 4), "float32")).shape
        (3, 2)
        >>> runner.predict(np.ones((3, 5), "float32"))
        Traceback (most recent call last):
        ...
        ValueError: Input 'input_layer...' of the .tflite model has the fixed shape (batch, 4); ...
    """

    def __init__(self, model, num_threads=None, use_xnnpack=True,
                 preserve_all_tensors=False):
        self.interpreter = make_interpreter(
            model, num_threads, use_xnnpack, preserve_all_tensors
        )
        self.interpreter.allocate_tensors()
        self.input_details = self.interpreter.get_input_details()
        self.output_details = self.interpreter.get_output_details()
        self._shapes = None

    @property
    def dynamic_batch(self):
        return all(
            len(d["shape_signature"]) > 0 and d["shape_signature"][0] == -1
            for d in self.input_details
        )

    def _as_list(self, x):
        """Orders inputs as the interpreter's input details.

        A dict is matched by input name (`export_tflite` names the inputs
        with the Keras model's keys or `Input` names); a list is in the
        exported model's input order (the Keras model's).
        """
        if isinstance(x, dict):
            return [x[_input_key(detail["name"], x)] for detail in self.input_details]
        if isinstance(x, (list, tuple)):
            if len(x) != len(self.input_details):
                raise ValueError(
                    f"The model has {len(self.input_details)} inputs, got {len(x)}."
                )
            return list(x)
        return [x]

    def _resize(self, inputs):
        shapes = [input_shape_for(d, x) for d, x in zip(self.input_details, inputs)]
        if self._shapes == shapes:
            return
        for detail, shape in zip(self.input_details, shapes):
            self.interpreter.resize_tensor_input(detail["index"], shape)
        self.interpreter.allocate_tensors()
        self._shapes = shapes

    def invoke(self, inputs):
        """Runs one batch; `inputs` is a list in input-detail order."""
        for detail, x in zip(self.input_details, inputs):
            self.interpreter.set_tensor(detail["index"], quantize_array(x, detail))
        self.interpreter.invoke()
        return [
            dequantize_array(self.interpreter.get_tensor(d["index"]), d)
            for d in self.output_details
        ]

    def check_inputs(self, x):
        """Returns `x` as one array per input, in file order; a `ValueError` names a misfit.

        Each array must have the shape the file fixed, batch axis aside
        (see `input_shape_for`).
        """
        inputs = [np.asarray(v) for v in self._as_list(x)]
        for detail, v in zip(self.input_details, inputs):
            input_shape_for(detail, v)
        return inputs

    def predict(self, x, batch_size=256):
        """Returns the dequantized outputs for all samples of `x`."""
        inputs = self.check_inputs(x)  # A wrong shape fails before any invoke.
        n = len(inputs[0])
        step = batch_size if self.dynamic_batch else int(self.input_details[0]["shape"][0])
        results = []
        for start in range(0, n, step):
            chunk = [v[start : start + step] for v in inputs]
            self._resize(chunk)
            results.append(self.invoke(chunk))
        outputs = [np.concatenate([r[i] for r in results]) for i in range(len(self.output_details))]
        return outputs[0] if len(outputs) == 1 else outputs

    def output_steps(self):
        """The quantization step (scale) of each output, 0 for float outputs."""
        return [d["quantization"][0] for d in self.output_details]
