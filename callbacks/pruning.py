"""`PruningScheduler`: sets the pruning schedule in the graph and logs the sparsity."""

import keras
import numpy as np
from keras import ops

from qat_plugin.pruning.prune import pruned_layers
from qat_plugin.sparsity import PruningSchedule


def model_sparsity(model):
    """The fraction of all pruned kernel weights of `model` that are masked out.

    Examples:
        >>> import keras, numpy as np, qat_plugin
        >>> from qat_plugin.callbacks import model_sparsity
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
        >>> pruned = qat_plugin.prune_model(model, 0.25)
        >>> _ = pruned(np.ones((1, 8)), training=True)
        >>> model_sparsity(pruned)
        0.25
    """
    zeros = total = 0
    for layer in pruned_layers(model):
        for mask in layer.masks:
            zeros += int(np.sum(ops.convert_to_numpy(mask) == 0))
            total += int(np.prod(mask.shape))
    return zeros / total if total else 0.0


@keras.saving.register_keras_serializable(package="qat_plugin")
class PruningScheduler(keras.callbacks.Callback):
    """Drives the pruning schedule during `fit` and logs the model's sparsity.

    Every `PrunedLayer` counts its own training steps in a variable and
    compares the count with its schedule, also held in variables: masks are
    recomputed inside the compiled train function at the exact update
    steps, with no retrace, also with `steps_per_execution > 1` and under
    `tf.distribute`. This callback writes a new schedule into those
    variables when training begins (when one is given) and adds
    `sparsity`, the fraction of pruned-kernel weights that are masked out,
    to the logs of every epoch (and so to `History`). When training ends
    it multiplies the stored kernels by their masks: a no-op where the
    optimizer applies the layers' mask constraint, and what keeps stored
    pruned weights zero on the JAX backend.

    Steps count each pruned layer's training calls from the pruned model's
    first training step (the counter is saved in `.keras` files), not from
    the start of this `fit` call; in a model from `quantize_model` the
    pruning layers keep counting through QAT.

    Args:
        schedule: a `ConstantSparsity` or `PolynomialDecay` for every pruned
            layer, or None to keep the schedules given to `prune_model`.

    Examples:
        >>> import keras, numpy as np, qat_plugin
        >>> from qat_plugin.callbacks import PruningScheduler
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
        >>> pruned = qat_plugin.prune_model(model, 0.5)
        >>> pruned.compile("sgd", "mse")
        >>> schedule = qat_plugin.PolynomialDecay(0.0, 0.75, begin_step=0,
        ...                                       end_step=3, frequency=1)
        >>> history = pruned.fit(np.ones((8, 8)), np.ones((8, 4)), batch_size=2,
        ...                      verbose=0, callbacks=[PruningScheduler(schedule)])
        >>> history.history["sparsity"]
        [0.75]
    """

    def __init__(self, schedule=None):
        super().__init__()
        if schedule is not None and not isinstance(schedule, PruningSchedule):
            raise TypeError(
                "PruningScheduler: schedule must be a ConstantSparsity or "
                f"PolynomialDecay, or None; got {type(schedule).__name__}."
            )
        self.schedule = schedule

    def on_train_begin(self, logs=None):
        layers = pruned_layers(self.model)
        if not layers:
            raise ValueError(
                f"PruningScheduler: model '{self.model.name}' has no pruned "
                "layers; pass the model returned by qat_plugin.prune_model "
                "(or quantize_model of it)."
            )
        if self.schedule is not None:
            for layer in layers:
                layer.set_schedule(self.schedule)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["sparsity"] = model_sparsity(self.model)

    def on_train_end(self, logs=None):
        # Already exact where the optimizer applies the mask constraint;
        # on JAX this is what zeroes the stored pruned weights.
        for layer in pruned_layers(self.model):
            layer.zero_pruned_weights()

    def get_config(self):
        return {
            "schedule": None
            if self.schedule is None
            else keras.saving.serialize_keras_object(self.schedule)
        }

    @classmethod
    def from_config(cls, config):
        schedule = config.get("schedule")
        if schedule is not None:
            schedule = keras.saving.deserialize_keras_object(schedule)
        return cls(schedule)
