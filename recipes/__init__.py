"""Recipes: named, documented QAT setups read from TOML files.

A recipe packages a tested combination: the quantization scheme
(`[quantization]`), the training schedule (`[schedule]`: the
`QuantizationScheduler` points), an optional pruning phase (`[pruning]`)
and the export settings with a deployment target (`[export]`). A recipe is a
TOML file read with `tomllib`: loading one never executes code. The
built-in ones ship in this package; `names()` lists them, `get(name)` loads
one and `load(path)` reads a user's file, which may start from a built-in
one with `extends = "int8"` and override single fields. In Python,
`recipe.replace(...)` does the same.

The workflow a recipe drives:

1. `pruned = recipe.prune(model)`: for a pruning recipe, a `prune_model`
   copy; fine-tune it with `recipe.callbacks()` (a `PruningScheduler`) for
   `recipe.pruning.epochs` epochs. Other recipes return `model` unchanged.
2. `qat = recipe.quantize(pruned)`: `quantize_model(pruned, recipe)`;
   the pruned layers keep their masks (pruning-preserving QAT).
3. `qat.fit(..., callbacks=recipe.callbacks())`: the
   `QuantizationScheduler` of `[schedule]` (none when the schedule is
   "quantize from step 0, never freeze") and, for a pruned model, a
   `PruningScheduler` that keeps the masks.
4. `recipe.export_tflite(qat, path)`: `export_tflite` with the `[export]`
   settings, checked against the recipe's target.

Examples:
    >>> import keras, numpy as np
    >>> from qat_plugin import recipes
    >>> recipe = recipes.get("int8-pruned-50")
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8),
    ...                           keras.layers.ReLU(), keras.layers.Dense(2)])
    >>> x, y = np.random.rand(64, 8).astype("float32"), np.zeros((64, 2), "float32")
    >>> pruned = recipe.prune(model, steps_per_epoch=4)  # 64 samples, batch 16
    >>> pruned.compile("adam", "mse")
    >>> _ = pruned.fit(x, y, batch_size=16, epochs=recipe.pruning.epochs, verbose=0,
    ...                callbacks=recipe.callbacks(pruned))
    >>> qat = recipe.quantize(pruned)
    >>> qat.compile("adam", "mse")
    >>> _ = qat.fit(x, y, batch_size=16, epochs=1, verbose=0,
    ...             callbacks=recipe.callbacks(qat))
    >>> report = recipe.inspect(recipe.export_tflite(qat))
    >>> report.is_fully_int8, round(report.weight_sparsity, 2)
    (True, 0.5)
"""

import dataclasses

from qat_plugin.config.recipe import (
    ExportSettings,
    Pruning,
    QuantizationScheme,
    RecipeConfig,
    Schedule,
)
from qat_plugin.callbacks import PruningScheduler, QuantizationScheduler
from qat_plugin.config import recipe_files
from qat_plugin.config.constants import NEVER, UNSTRUCTURED
from qat_plugin.errors import RecipeError
from qat_plugin.layers.base import is_quantized
from qat_plugin.pruning import prune_model, pruned_layers
from qat_plugin.quantize import quantize_model
from qat_plugin.sparsity import ConstantSparsity, PolynomialDecay
from qat_plugin.tflite.convert import export_tflite
from qat_plugin.tflite.inspection import inspect_tflite

__all__ = [
    "ExportSettings", "Pruning", "QuantizationScheme", "Recipe", "RecipeError",
    "Schedule", "get", "load", "names", "path_of", "resolve",
]


@dataclasses.dataclass(frozen=True)
class Recipe(RecipeConfig):
    """A named QAT setup and the workflow it drives.

    The fields are `RecipeConfig`'s (name, description, quantization,
    schedule, pruning, export, source); the methods run the workflow.
    """

    # -- the workflow ----------------------------------------------------

    def prune(self, model, *, steps_per_epoch=None, skip=()):
        """Returns `prune_model(model, ...)` per `[pruning]`, or `model` itself.

        Masks update every `frequency` steps from `begin` to `end`, then
        freeze, so the QAT that follows keeps them (pruning-preserving QAT).
        Points in epochs need `steps_per_epoch` (the pruning fine-tuning's).
        Fine-tune the result with `self.callbacks(pruned)` for
        `self.pruning.epochs` epochs. `skip` names layers to keep dense;
        an N:M recipe also leaves dense, with a warning, the layers whose
        input channels are not a multiple of M (a 1-channel image stem), as
        `prune_model` does: the result's `pruning_skipped` lists them.
        """
        if not self.pruning.enabled:
            return model
        p = self.pruning
        begin, end = (self._steps(v, p.unit, steps_per_epoch, "pruning")
                      for v in (p.begin, p.end))
        if p.structure != UNSTRUCTURED:
            # The pattern fixes the sparsity; masks update until `end`.
            n, m = (int(v) for v in p.structure.split(":"))
            schedule = ConstantSparsity(n / m, begin_step=begin,
                                        end_step=max(end, begin), frequency=p.frequency)
            return prune_model(model, structure=p.structure, schedule=schedule, skip=skip)
        if p.schedule == "constant":
            schedule = ConstantSparsity(p.sparsity, begin_step=begin,
                                        end_step=max(end, begin), frequency=p.frequency)
        else:
            schedule = PolynomialDecay(0.0, p.sparsity, begin_step=begin,
                                       end_step=max(end, begin + 1), power=p.power,
                                       frequency=p.frequency)
        return prune_model(model, schedule=schedule, skip=skip)

    def quantize(self, model, *, skip=()):
        """Returns `quantize_model(model, recipe=self, skip=skip)`."""
        return quantize_model(model, self, skip=skip)

    def callbacks(self, model=None, *, steps_per_epoch=None):
        """Returns the callbacks to pass to `fit` for `model`'s phase.

        For a model with quantized layers: the `QuantizationScheduler` of
        `[schedule]` (omitted when it is trivial). For a model with pruned
        layers: a `PruningScheduler` (keeping the masks `prune` set up).
        With `model=None`, the QAT phase's callbacks.
        """
        callbacks = []
        quantized = model is None or is_quantized(model)
        if quantized and not self.schedule.is_trivial:
            s = self.schedule
            callbacks.append(QuantizationScheduler(
                quantize_start=s.quantize_start, bn_freeze=s.bn_freeze,
                range_freeze=s.range_freeze, unit=s.unit,
                steps_per_epoch=steps_per_epoch,
            ))
        if model is not None and pruned_layers(model):
            callbacks.append(PruningScheduler())
        return callbacks

    def export_kwargs(self):
        """The `export_tflite` keywords of `[export]`."""
        return {
            "target": None if self.export.target == "any" else self.export.target,
            "sparse_weights": self.export.sparse_weights,
            "allow_select_tf_ops": self.export.allow_select_tf_ops,
        }

    def export_tflite(self, model, path=None, *, input_shape=None):
        """`export_tflite(model, path, input_shape=..., **self.export_kwargs())`."""
        return export_tflite(model, path, input_shape=input_shape, **self.export_kwargs())

    def inspect(self, tflite):
        """`inspect_tflite` with the recipe's target checked."""
        targets = () if self.export.target == "any" else (self.export.target,)
        return inspect_tflite(tflite, targets=targets)

    def _steps(self, value, unit, steps_per_epoch, section):
        # A point this late never comes; one step before NEVER leaves room
        # for a polynomial schedule's end one step after its begin.
        if unit == "step":
            return min(int(value), NEVER - 1)
        if steps_per_epoch is None:
            raise RecipeError(
                f"Recipe '{self.name}': [{section}] is in epochs; pass "
                "steps_per_epoch= (the fine-tuning's steps per epoch)."
            )
        return min(round(value * steps_per_epoch), NEVER - 1)


def names():
    """Returns the sorted names of the built-in recipes."""
    return recipe_files.names()


def path_of(name):
    """Returns the file of built-in recipe `name`."""
    return recipe_files.path_of(name)


def get(name):
    """Loads the built-in recipe `name`."""
    return recipe_files.load(recipe_files.path_of(name), cls=Recipe)


def load(path):
    """Reads and validates the recipe file at `path`."""
    return recipe_files.load(path, cls=Recipe)


def resolve(recipe):
    """Returns a `Recipe` from a name, a path or a `Recipe`."""
    return recipe_files.resolve(recipe, cls=Recipe)
