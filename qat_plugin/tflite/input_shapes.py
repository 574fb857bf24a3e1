"""The fixed input shapes an export is traced with (`export_tflite(input_shape=...)`).

A Keras input may leave dimensions undefined: token ids `(None, None)`,
images of any size `(None, None, None, 3)`. The converter would write such
an input as size 1 wherever the size is unknown (a `(1, 1, 1, 3)` image, a
`(1, 1)` token input) and the file would only run on inputs of that size.
So an export fixes every non-batch dimension: the model's own where it is
defined, `input_shape` where it is not; a model with an undefined dimension
and no `input_shape` is refused with an `ExportError` naming the input.
The batch dimension stays dynamic (stored as 1; `TFLiteModel` resizes it).

`input_shape` is the shape of one sample, without the batch axis: a tuple
for a single-input model, a dict keyed by input name (the names the file
gives its inputs: a dict input's key, else the `Input` layer's name) or a
list in `model.inputs` order for several. Inputs left out of a dict (or
given as None in a list) keep the model's shape, which must then be defined.

Examples:
    >>> import keras
    >>> from qat_plugin.tflite.input_shapes import export_input_specs
    >>> model = keras.Sequential([keras.Input((None, None, 3), name="image"),
    ...                           keras.layers.Conv2D(2, 3)])
    >>> [spec.shape for spec in export_input_specs(model, (16, 16, 3))]
    [(16, 16, 3)]
    >>> export_input_specs(model)
    Traceback (most recent call last):
    ...
    qat_plugin.errors.ExportError: Input 'image' of model 'sequential...' has the undefined shape (batch, None, None, 3):...
"""

import dataclasses
import numbers

from qat_plugin.data.batches import input_specs
from qat_plugin.errors import ExportError
from qat_plugin.tflite.io_names import keras_io_names

ARGUMENT = "input_shape"


def _shown(shape):
    return "(batch, " + ", ".join(str(d) for d in shape) + ")"


def _is_shape(value):
    """True for one shape: a list or tuple of sizes (not of shapes)."""
    return isinstance(value, (list, tuple)) and not any(
        isinstance(v, (list, tuple, dict)) for v in value
    )


def _example(shape):
    """`shape` with its undefined sizes filled in, for a message: `(224, 224, 3)`, `(128,)`."""
    filled = tuple((224 if len(shape) > 2 else 128) if d is None else d for d in shape)
    return str(filled) if len(filled) != 1 else f"({filled[0]},)"


def _per_input(model, names, input_shape, argument):
    """`input_shape` as one entry (a shape or None) per input, in model order."""
    if input_shape is None:
        return [None] * len(names)
    if isinstance(input_shape, dict):
        aliases = {spec.name: name for spec, name in zip(input_specs(model), names)}
        unknown = [k for k in input_shape if k not in names and k not in aliases]
        if unknown:
            raise ExportError(
                f"{argument}: {unknown} name no input of model '{model.name}'; "
                f"its inputs are {names}. Key {argument} by these names."
            )
        keyed = {aliases.get(k, k): v for k, v in input_shape.items()}
        return [keyed.get(name) for name in names]
    if _is_shape(input_shape):
        if len(names) == 1:
            return [input_shape]
        raise ExportError(
            f"{argument}={tuple(input_shape)!r} is one shape, but model "
            f"'{model.name}' has {len(names)} inputs {names}: pass a dict "
            f"keyed by input name, e.g. {argument}={{{names[0]!r}: (...), ...}}, "
            "or a list of shapes in that order."
        )
    if isinstance(input_shape, (list, tuple)):
        if len(input_shape) != len(names):
            raise ExportError(
                f"{argument} lists {len(input_shape)} shapes but model "
                f"'{model.name}' has {len(names)} inputs {names}: give one "
                "shape per input (None for an input whose shape is defined), "
                "or a dict keyed by input name."
            )
        return list(input_shape)
    raise ExportError(
        f"{argument} must be a shape tuple (one sample's shape, without the "
        "batch axis), a dict of them keyed by input name or a list of them; "
        f"got {type(input_shape).__name__} {input_shape!r}."
    )


def _fixed(model, name, defined, given, argument):
    """The fixed shape of input `name` from its `defined` shape and the `given` one."""
    label = f"{argument} for input '{name}'" if len(model.inputs) > 1 else argument
    if given is None:
        if any(d is None for d in defined):
            raise ExportError(
                f"Input '{name}' of model '{model.name}' has the undefined "
                f"shape {_shown(defined)}: a .tflite input has a fixed size, "
                "and the converter would silently make every undefined size "
                f"1. Pass {argument}= with the shape of one sample, without "
                f"the batch axis (e.g. {argument}={_example(defined)}"
                + (f" or {argument}={{{name!r}: {_example(defined)}, ...}}"
                   if len(model.inputs) > 1 else "")
                + ")."
            )
        return tuple(defined)
    if not _is_shape(given):
        raise ExportError(
            f"{label} must be a tuple of sizes, got {type(given).__name__} {given!r}."
        )
    given = tuple(given)
    if len(given) != len(defined):
        extra = (
            " It looks like it includes the batch axis: leave that out (the "
            "batch axis stays dynamic)."
            if len(given) == len(defined) + 1
            else ""
        )
        raise ExportError(
            f"{label}={given!r} has {len(given)} dimensions but input "
            f"'{name}' has {len(defined)} per sample, shape {_shown(defined)}."
            f"{extra} Give one sample's shape, e.g. {argument}={_example(defined)}."
        )
    for axis, (want, got) in enumerate(zip(defined, given)):
        if not isinstance(got, numbers.Integral) or isinstance(got, bool) or got < 1:
            raise ExportError(
                f"{label}={given!r}: dimension {axis + 1} is {got!r}; every "
                "size must be a positive int (the batch axis is left out "
                "and stays dynamic)."
            )
        if want is not None and want != int(got):
            raise ExportError(
                f"{label}={given!r} conflicts with input '{name}' of model "
                f"'{model.name}', shape {_shown(defined)}: dimension "
                f"{axis + 1} is {want} in the model, {got} given. Keep the "
                "model's defined sizes and fix only the None ones."
            )
    return tuple(int(d) for d in given)


def export_input_specs(model, input_shape=None, argument=ARGUMENT):
    """Returns an `InputSpec` per input of `model` with every non-batch size fixed.

    Raises an `ExportError` naming the input and `argument` when a size is
    undefined and `input_shape` does not give it, or when `input_shape` does
    not fit the model (see the module's docstring for its forms).

    Examples:
        >>> import keras
        >>> from qat_plugin.tflite.input_shapes import export_input_specs
        >>> tokens = keras.Input((None,), dtype="int32", name="tokens")
        >>> mask = keras.Input((None,), name="mask")
        >>> x = keras.layers.Embedding(10, 4)(tokens) * mask[..., None]
        >>> model = keras.Model([tokens, mask], keras.layers.Dense(2)(x))
        >>> [s.shape for s in export_input_specs(model, {"tokens": (12,), "mask": (12,)})]
        [(12,), (12,)]
        >>> export_input_specs(model, {"tokens": (12,), "mask": (0,)})
        Traceback (most recent call last):
        ...
        qat_plugin.errors.ExportError: input_shape for input 'mask'=(0,): dimension 1 is 0; ...
    """
    specs = input_specs(model)
    names = keras_io_names(model)[0]
    given = _per_input(model, names, input_shape, argument)
    return [
        dataclasses.replace(spec, shape=_fixed(model, name, spec.shape, shape, argument))
        for spec, name, shape in zip(specs, names, given)
    ]


def signature_input_shape(model, input_signature):
    """The `input_shape` that Keras' `export(..., input_signature=...)` states.

    `input_signature` is a list of `keras.InputSpec` or `tf.TensorSpec`
    (anything with a `shape` whose first axis is the batch), one per input,
    or a dict of them keyed by input name; a single spec is fine for a
    single-input model.

    Examples:
        >>> import keras
        >>> from qat_plugin.tflite.input_shapes import signature_input_shape
        >>> model = keras.Sequential([keras.Input((None, 3)), keras.layers.Dense(2)])
        >>> signature_input_shape(model, [keras.InputSpec(shape=(None, 8, 3))])
        [(8, 3)]
    """
    def sample_shape(spec):
        shape = getattr(spec, "shape", None)
        if shape is None or len(shape) < 1:
            raise ExportError(
                f"input_signature of model '{model.name}': {spec!r} has no "
                "shape with a batch axis first; give keras.InputSpec(shape="
                "(None, ...)) or tf.TensorSpec((None, ...), dtype) per input."
            )
        return tuple(shape)[1:]

    if isinstance(input_signature, dict):
        return {k: sample_shape(v) for k, v in input_signature.items()}
    if not isinstance(input_signature, (list, tuple)):
        input_signature = [input_signature]
    if len(input_signature) == 1 and isinstance(input_signature[0], (list, tuple)):
        input_signature = input_signature[0]  # Keras' own form: [[spec, spec]].
    return [sample_shape(spec) for spec in input_signature]
