"""Running the TensorFlow-only steps (export) for models trained on JAX or torch.

The training-time engine is written in `keras.ops` and trains on any Keras
backend, but the TFLite converter traces TensorFlow graphs. Keras picks its
backend once per process, so a model trained on JAX is saved to a `.keras`
file (config, weights, observed ranges and QAT schedule state all travel in
it), rebuilt in a child Python process started with
`KERAS_BACKEND=tensorflow`, and exported there. Arguments and the result
cross the process boundary as pickles in a temporary folder that is removed
afterwards.

"""

import importlib
import importlib.util
import os
import pickle
import subprocess
import sys
import tempfile

import keras
from qat_plugin.errors import TensorFlowProcessError

# The child returns one of these tags with its payload.
_RESULT = "result"
_ERROR = "error"

TENSORFLOW_REQUIREMENT = "tensorflow>=2.18"

_CHILD_COMMAND = (
    "import sys; from qat_plugin.tflite.tensorflow_process import _child_main; "
    "_child_main(*sys.argv[1:])"
)



def require_tensorflow(action):
    """Raises ModuleNotFoundError, saying what to install, if TensorFlow is missing.

    Args:
        action: what needs TensorFlow, for the message (e.g. "export_tflite").

    Examples:
        >>> from qat_plugin.tflite.tensorflow_process import require_tensorflow
        >>> require_tensorflow("export_tflite")  # installed here: returns None
    """
    if importlib.util.find_spec("tensorflow") is None:
        raise ModuleNotFoundError(
            f"{action} converts with TensorFlow's TFLite converter, and "
            "TensorFlow is not installed in this Python environment "
            f"({sys.executable}). Install it with "
            f"`pip install \"{TENSORFLOW_REQUIREMENT}\"` (the CPU package is "
            "enough); training on the JAX or torch backend does not need it.",
            name="tensorflow",
        )


def run_on_tensorflow(function, model, *args, **kwargs):
    """Calls `function(model, *args, **kwargs)` with `model` rebuilt on TensorFlow.

    The model is saved to a `.keras` file in a temporary folder and loaded
    (without its optimizer and compile state) in a child process started
    with `KERAS_BACKEND=tensorflow`, where `function` runs. `function` must
    be importable by its module and name; `args`, `kwargs` and its return
    value must pickle. An exception raised by `function` is raised again
    here, with the child's traceback as its cause.

    Args:
        function: a module-level function, e.g. `qat_plugin.export_tflite`.
        model: the Keras model (any backend).
        *args, **kwargs: passed to `function` after the rebuilt model.

    Returns:
        What `function` returned.

    Examples:
        >>> import keras, numpy as np, qat_plugin
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> qat = qat_plugin.quantize_model(model)
        >>> _ = qat(np.random.rand(8, 4).astype("float32"), training=True)
        >>> from qat_plugin.tflite.tensorflow_process import run_on_tensorflow
        >>> data = run_on_tensorflow(qat_plugin.export_tflite, qat)
        >>> qat_plugin.inspect_tflite(data).is_fully_int8
        True
    """
    name = getattr(function, "__qualname__", "")
    module = getattr(function, "__module__", None)
    if module is None or "<" in name or "." in name:
        raise ValueError(
            f"run_on_tensorflow needs a module-level function it can import "
            f"in the child process; got {function!r}."
        )
    require_tensorflow(f"{module}.{name}")
    layer_modules = _layer_modules(model)
    with tempfile.TemporaryDirectory(prefix="qat_plugin_tf_") as folder:
        model_path = os.path.join(folder, "model.keras")
        call_path = os.path.join(folder, "call.pkl")
        result_path = os.path.join(folder, "result.pkl")
        try:
            call = pickle.dumps((layer_modules, module, name, args, kwargs))
        except Exception as error:
            raise ValueError(
                f"The arguments of {module}.{name} cross to a TensorFlow "
                f"process and must pickle, but they do not ({error}). Pass "
                "NumPy arrays (e.g. representative_data as an array of "
                "samples) instead of generators or datasets."
            ) from error
        with open(call_path, "wb") as f:
            f.write(call)
        model.save(model_path)
        # The child imports what this process can: same sys.path.
        env = dict(
            os.environ,
            KERAS_BACKEND="tensorflow",
            PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
        )
        completed = subprocess.run(
            [sys.executable, "-c", _CHILD_COMMAND, model_path, call_path, result_path],
            env=env,
            capture_output=True,
            text=True,
        )
        if not os.path.exists(result_path):
            raise TensorFlowProcessError(
                f"The TensorFlow process running {module}.{name} exited with "
                f"status {completed.returncode} and no result. Its output "
                f"ended with:\n{completed.stderr[-4000:]}"
            )
        with open(result_path, "rb") as f:
            tag, payload = pickle.load(f)
    if tag == _ERROR:
        error, child_traceback = payload
        raise error from TensorFlowProcessError(
            f"Raised in the TensorFlow process:\n{child_traceback}"
        )
    return payload


def _layer_modules(model):
    """The modules defining `model`'s layer classes, which the child imports.

    A class defined in `__main__` (a script or notebook) cannot be imported
    by another process, so it is refused here with what to do.
    """
    modules = set()
    for layer in model._flatten_layers(include_self=True):
        module = type(layer).__module__
        if module == "__main__":
            raise ValueError(
                f"Layer '{layer.name}' is a {type(layer).__name__} defined in "
                "__main__; the TensorFlow process that exports the model "
                "cannot import it. Move the class to a module (a .py file "
                "on the Python path) and import it from there."
            )
        if not module.startswith(("keras.", "qat_plugin.")):
            modules.add(module)
    return sorted(modules)


def _child_main(model_path, call_path, result_path):
    """Loads the model on TensorFlow, runs the call, pickles the outcome."""
    import traceback

    with open(call_path, "rb") as f:
        layer_modules, module, name, args, kwargs = pickle.load(f)
    try:
        if keras.backend.backend() != "tensorflow":
            raise TensorFlowProcessError(
                "The export process expected KERAS_BACKEND=tensorflow but "
                f"Keras runs on '{keras.backend.backend()}'."
            )
        import qat_plugin.layers  # noqa: F401  (registers the quantized layers)

        # Registers the model's custom layer classes before loading.
        for layer_module in layer_modules:
            importlib.import_module(layer_module)

        function = getattr(importlib.import_module(module), name)
        model = keras.saving.load_model(model_path, compile=False)
        outcome = (_RESULT, function(model, *args, **kwargs))
    except Exception as error:  # Every failure goes back to the caller.
        details = traceback.format_exc()
        try:
            pickle.dumps(error)
        except Exception:
            error = TensorFlowProcessError(f"{type(error).__name__}: {error}")
        outcome = (_ERROR, (error, details))
    with open(result_path, "wb") as f:
        pickle.dump(outcome, f)
