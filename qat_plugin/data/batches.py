"""Reads user data (arrays, tf.data, PyDataset, generators) as checked batches.

Calibration (`export_tflite`) and evaluation (`compare`) accept the same
kinds of data that `model.fit` does, and both must reject a bad batch with
a message that says what is wrong before any converter or interpreter runs.
A batch is turned into one NumPy array per model input, in the order of
`model.inputs`, checked against that input's shape and dtype.

Elements streamed from a `tf.data.Dataset`, a `keras.utils.PyDataset` or a
generator follow `fit`'s convention: a tuple is `(inputs, targets[,
sample_weights])`, a list or dict holds the inputs of a multi-input model.
In-memory data given directly is the inputs themselves: an array, a list or
tuple of arrays (one per input) or a dict keyed by input name.
"""

import dataclasses
import itertools

import keras
import numpy as np
from keras import tree


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What one model input accepts: its name, per-sample shape and dtype."""

    name: str
    shape: tuple  # without the batch axis; None where any size goes
    dtype: str


def input_specs(model):
    """Returns an `InputSpec` per input of `model`, in `model.inputs` order."""
    if not getattr(model, "inputs", None):
        raise ValueError(
            f"Model '{model.name}' has no defined inputs; build it with "
            "keras.Input (or call it on data once) before exporting."
        )
    return [
        InputSpec(
            name=t._keras_history.operation.name,
            shape=tuple(t.shape[1:]),
            dtype=str(t.dtype),
        )
        for t in model.inputs
    ]


def model_call_inputs(model, arrays):
    """Packs per-input values (`model.inputs` order) the way `model` is called.

    Functional models keep the structure they were built with (a tensor, a
    list or a dict); a Sequential model takes its one input as is.
    """
    structure = getattr(model, "_inputs_struct", None)
    if structure is None:
        return arrays[0] if len(arrays) == 1 else list(arrays)
    return tree.pack_sequence_as(structure, list(arrays))


def is_in_memory(data):
    """True for arrays, lists/tuples/dicts of arrays: data that is not streamed."""
    if isinstance(data, dict):
        return all(is_in_memory(v) for v in data.values())
    if isinstance(data, (list, tuple)):
        return all(is_in_memory(v) for v in data)
    return isinstance(data, (int, float, np.ndarray)) or hasattr(data, "__array__")


def stream(data, argument):
    """Yields the raw elements of `data` (one element when it is in memory).

    Args:
        data: an array-like, a list/tuple/dict of them, a `tf.data.Dataset`,
            a `keras.utils.PyDataset` or any iterable of batches.
        argument: the argument's name, for error messages.
    """
    if data is None:
        raise ValueError(f"{argument} is None; pass samples of the model's inputs.")
    if is_in_memory(data):
        yield data
        return
    if isinstance(data, keras.utils.PyDataset):
        count = data.num_batches
        indices = itertools.count() if count is None else range(count)
        for index in indices:
            yield data[index]
        return
    if _is_tf_dataset(data):
        yield from data.as_numpy_iterator()
        return
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(
            f"{argument} must be a NumPy array (or a list/dict of arrays, one "
            "per input), a tf.data.Dataset, a keras.utils.PyDataset or a "
            f"generator of batches; got {type(data).__name__}."
        )
    yield from data


def _is_tf_dataset(data):
    module = type(data).__module__
    return module.startswith("tensorflow") and hasattr(data, "as_numpy_iterator")


def split_element(element, streamed):
    """Returns `(inputs, targets)` of one element (`targets` may be None)."""
    if streamed and isinstance(element, tuple):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(element)
        return x, y
    return element, None


def input_arrays(x, specs, argument, where=""):
    """Returns one checked NumPy array per input for batch `x`.

    Raises a `ValueError` naming `argument`, the batch (`where`) and the input
    when the batch does not fit the model: wrong number of arrays, wrong
    shape, a dtype that does not convert, no samples, NaN or inf.
    """
    where = f" ({where})" if where else ""
    if isinstance(x, dict):
        names = [spec.name for spec in specs]
        missing = [n for n in names if n not in x]
        extra = [k for k in x if k not in names]
        if missing or extra:
            raise ValueError(
                f"{argument}{where}: dict keys {sorted(x)} do not match the "
                f"model's input names {names} (missing {missing}, unknown "
                f"{extra})."
            )
        arrays = [x[n] for n in names]
    elif isinstance(x, (list, tuple)):
        arrays = list(x)
    else:
        arrays = [x]
    if len(arrays) != len(specs):
        hint = (
            " Streamed tuples are read as (inputs, targets) as in fit(); give "
            "the inputs of a multi-input model as a list or dict."
            if len(specs) > 1
            else " For a single-input model pass one array (or (x, y) tuples "
            "from a dataset or generator)."
        )
        raise ValueError(
            f"{argument}{where} has {len(arrays)} arrays but the model has "
            f"{len(specs)} inputs {[s.name for s in specs]}.{hint}"
        )
    checked = [_check_array(a, spec, argument, where) for a, spec in zip(arrays, specs)]
    sizes = {len(a) for a in checked}
    if len(sizes) > 1:
        raise ValueError(
            f"{argument}{where}: the inputs have different numbers of samples "
            f"{[len(a) for a in checked]}."
        )
    return checked


def _check_array(array, spec, argument, where):
    label = f"{argument}{where}, input '{spec.name}'"
    try:
        array = np.asarray(array)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{label}: cannot be read as an array ({e}).") from None
    if array.dtype.kind not in "biuf":
        raise ValueError(
            f"{label} has dtype {array.dtype}; the model expects numbers "
            f"({spec.dtype})."
        )
    target = np.dtype(spec.dtype)
    if target.kind in "iu" and array.dtype.kind == "f":
        raise ValueError(
            f"{label} has dtype {array.dtype} but the input is {spec.dtype}; "
            "cast the data to integers first."
        )
    if array.ndim != len(spec.shape) + 1 or any(
        want is not None and want != got
        for want, got in zip(spec.shape, array.shape[1:])
    ):
        expected = ("batch",) + tuple("any" if s is None else s for s in spec.shape)
        raise ValueError(
            f"{label} has shape {array.shape}; expected {expected} (a batch "
            "axis first, then one sample's shape)."
        )
    if len(array) == 0:
        raise ValueError(f"{label} holds no samples (its batch axis is 0).")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(
            f"{label} contains {bad} NaN or inf values; clean or drop those "
            "samples."
        )
    return array.astype(target, copy=False)


def calibration_samples(model, data, max_samples, argument="representative_data",
                        specs=None):
    """Returns up to `max_samples` single-sample input lists from `data`.

    Every batch read is checked (`input_arrays`) before it is used, against
    `specs` (default: the model's `input_specs`; an export passes the shapes
    it fixed), and reading stops once `max_samples` samples are collected,
    so an endless generator is fine.
    """
    if max_samples < 1:
        raise ValueError(f"calibration_steps must be at least 1, got {max_samples}.")
    specs = specs or input_specs(model)
    streamed = not is_in_memory(data)
    samples = []
    for index, element in enumerate(stream(data, argument)):
        x, _ = split_element(element, streamed)
        where = f"batch {index}" if streamed else ""
        arrays = input_arrays(x, specs, argument, where)
        for i in range(len(arrays[0])):
            samples.append([a[i : i + 1] for a in arrays])
            if len(samples) == max_samples:
                return samples
    if not samples:
        raise ValueError(f"{argument} yielded no batches.")
    return samples


def labelled_arrays(model, data, argument="eval_data"):
    """Reads all of `data` as `(inputs, targets)`: a list of arrays and one array.

    In-memory data must be an `(x, y)` tuple; streamed data yields `(x, y)`
    batches, as for `model.evaluate`.
    """
    specs = input_specs(model)
    streamed = not is_in_memory(data)
    if not streamed:
        if not (isinstance(data, tuple) and len(data) in (2, 3)):
            raise ValueError(
                f"{argument} must be an (x, y) tuple of arrays, or a dataset or "
                "generator of (x, y) batches: the targets are needed to score "
                "accuracy."
            )
    elements = stream(data, argument) if streamed else [data]
    inputs, targets = [], []
    for index, element in enumerate(elements):
        x, y = split_element(element, streamed=True)
        where = f"batch {index}" if streamed else ""
        if y is None:
            raise ValueError(
                f"{argument} ({where or 'data'}) has no targets: give (x, y) "
                "batches."
            )
        arrays = input_arrays(x, specs, argument, where)
        y = np.asarray(y)
        if len(y) != len(arrays[0]):
            raise ValueError(
                f"{argument} ({where or 'data'}): {len(arrays[0])} samples but "
                f"{len(y)} targets."
            )
        inputs.append(arrays)
        targets.append(y)
    if not inputs:
        raise ValueError(f"{argument} yielded no batches.")
    return (
        [np.concatenate([b[i] for b in inputs]) for i in range(len(specs))],
        np.concatenate(targets),
    )
