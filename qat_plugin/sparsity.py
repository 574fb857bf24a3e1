"""Pruning masks and sparsity schedules, in `keras.ops`.

Masks are computed in the training graph from the kernel's magnitudes:

- unstructured: the `round(sparsity * size)` weights of smallest magnitude
  are zeroed (an exact count, ties broken by position);
- N:M: `N` of every `M` consecutive weights along the kernel's input-channel
  axis (the second to last axis of every Keras Conv/Dense kernel) are
  zeroed, the `N` smallest of each group. 2:4 is the pattern sparse tensor
  cores and sparse kernels use.

A schedule says which sparsity a layer should have at each of its training
steps and at which steps its masks are recomputed (Zhu & Gupta 2017, "To
prune, or not to prune"). Its parameters live in variables of the pruned
layer, so changing the schedule never retraces the training function.
"""

import keras
import numpy as np
from keras import ops

from qat_plugin.config.constants import NEVER, UNSTRUCTURED


def _check_sparsity(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r}.")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}.")
    return float(value)


def _check_step(name, value, minimum=0):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer step, got {value!r}.")
    if not minimum <= int(value) <= NEVER:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}.")
    return int(value)


class PruningSchedule:
    """Base of the sparsity schedules: `s(t)` and the steps masks update.

    The sparsity at step `t` is
    `final + (initial - final) * (1 - clip((t - begin) / (end - begin), 0, 1)) ** power`
    and masks are recomputed at `begin, begin + frequency, ...` up to
    `end`, and at `end` itself so that the final sparsity is reached.
    """

    def __init__(self, initial_sparsity, final_sparsity, begin_step, end_step,
                 power, frequency):
        self.initial_sparsity = _check_sparsity("initial_sparsity", initial_sparsity)
        self.final_sparsity = _check_sparsity("final_sparsity", final_sparsity)
        self.begin_step = _check_step("begin_step", begin_step)
        self.end_step = _check_step("end_step", end_step)
        self.frequency = _check_step("frequency", frequency, minimum=1)
        if self.end_step < self.begin_step:
            raise ValueError(
                f"end_step ({self.end_step}) is before begin_step "
                f"({self.begin_step}): the schedule must end after it starts."
            )
        self.power = float(power)

    def step_parameters(self):
        """`[begin, end, frequency]`: the int32 schedule variable's value."""
        return np.array([self.begin_step, self.end_step, self.frequency], np.int32)

    def sparsity_parameters(self):
        """`[initial, final, power]`: the float schedule variable's value."""
        return np.array(
            [self.initial_sparsity, self.final_sparsity, self.power], np.float32
        )

    def sparsity_at(self, step):
        """The target sparsity at `step`, in Python (mirrors the graph)."""
        span = max(self.end_step - self.begin_step, 1)
        progress = min(max((step - self.begin_step) / span, 0.0), 1.0)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (
            1.0 - progress
        ) ** self.power

    def updates_at(self, step):
        """True when masks are recomputed at `step` (mirrors the graph)."""
        if not self.begin_step <= step <= self.end_step:
            return False
        return (step - self.begin_step) % self.frequency == 0 or step == self.end_step

    def get_config(self):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package="qat_plugin")
class ConstantSparsity(PruningSchedule):
    """One sparsity from `begin_step` on, masks recomputed every `frequency` steps.

    Args:
        sparsity: fraction of weights zeroed, in [0, 1).
        begin_step: the layer's training step of the first mask update.
        end_step: the last step at which masks update (default: never
            stop). After it the masks are frozen.
        frequency: steps between mask updates.

    Examples:
        >>> schedule = ConstantSparsity(0.5, begin_step=10, frequency=5)
        >>> schedule.sparsity_at(0), schedule.updates_at(10), schedule.updates_at(12)
        (0.5, True, False)
    """

    def __init__(self, sparsity, begin_step=0, end_step=None, frequency=100):
        _check_sparsity("sparsity", sparsity)
        super().__init__(
            sparsity,
            sparsity,
            begin_step,
            NEVER if end_step is None else end_step,
            power=1.0,
            frequency=frequency,
        )

    @property
    def sparsity(self):
        return self.final_sparsity

    def get_config(self):
        return {
            "sparsity": self.final_sparsity,
            "begin_step": self.begin_step,
            "end_step": None if self.end_step == NEVER else self.end_step,
            "frequency": self.frequency,
        }


@keras.saving.register_keras_serializable(package="qat_plugin")
class PolynomialDecay(PruningSchedule):
    """Sparsity rising from `initial_sparsity` to `final_sparsity` (Zhu & Gupta 2017).

    `s(t) = final + (initial - final) * (1 - (t - begin) / (end - begin)) ** power`
    between `begin_step` and `end_step`; masks update every `frequency`
    steps in that range (and at `end_step`), then stay frozen.

    Args:
        initial_sparsity: sparsity at `begin_step`, in [0, 1).
        final_sparsity: sparsity from `end_step` on, in [0, 1).
        begin_step: the layer's training step where pruning starts.
        end_step: where it reaches `final_sparsity`; after `begin_step`.
        power: the exponent (3 in the paper).
        frequency: steps between mask updates.

    Examples:
        >>> schedule = PolynomialDecay(0.0, 0.8, begin_step=0, end_step=100)
        >>> round(schedule.sparsity_at(50), 4), schedule.sparsity_at(100)
        (0.7, 0.8)
    """

    def __init__(self, initial_sparsity=0.0, final_sparsity=0.5, begin_step=0,
                 end_step=1000, power=3.0, frequency=100):
        super().__init__(
            initial_sparsity, final_sparsity, begin_step, end_step, power, frequency
        )
        if self.end_step == self.begin_step:
            raise ValueError(
                f"end_step ({self.end_step}) equals begin_step: a polynomial "
                "decay needs end_step > begin_step (use ConstantSparsity for "
                "one sparsity from the start)."
            )

    def get_config(self):
        return {
            "initial_sparsity": self.initial_sparsity,
            "final_sparsity": self.final_sparsity,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "power": self.power,
            "frequency": self.frequency,
        }


def parse_structure(structure):
    """Returns None for unstructured pruning, or `(n, m)` for N:M.

    Examples:
        >>> parse_structure("2:4"), parse_structure("unstructured")
        ((2, 4), None)
    """
    if structure == UNSTRUCTURED or structure is None:
        return None
    pattern = structure
    if isinstance(structure, str):
        parts = structure.split(":")
        try:
            pattern = tuple(int(p) for p in parts)
        except ValueError:
            pattern = ()
    if (
        not isinstance(pattern, (tuple, list))
        or len(pattern) != 2
        or not all(isinstance(p, (int, np.integer)) for p in pattern)
        or not 0 < pattern[0] < pattern[1]
    ):
        raise ValueError(
            f"structure must be 'unstructured' or 'N:M' with 0 < N < M (N "
            f"zeros in every M consecutive weights, e.g. '2:4'), got "
            f"{structure!r}."
        )
    return int(pattern[0]), int(pattern[1])


def format_structure(pattern):
    """The inverse of `parse_structure`."""
    return UNSTRUCTURED if pattern is None else f"{pattern[0]}:{pattern[1]}"


# -- in-graph ---------------------------------------------------------------


def scheduled_sparsity(step, step_parameters, sparsity_parameters):
    """The schedule's sparsity at `step`, from its variables (a float tensor)."""
    begin = ops.cast(step_parameters[0], "float32")
    end = ops.cast(step_parameters[1], "float32")
    initial, final, power = (sparsity_parameters[i] for i in range(3))
    span = ops.maximum(end - begin, 1.0)
    progress = ops.clip((ops.cast(step, "float32") - begin) / span, 0.0, 1.0)
    return final + (initial - final) * ops.power(1.0 - progress, power)


def is_update_step(step, step_parameters):
    """True (a bool tensor) when masks are recomputed at `step`."""
    begin, end, frequency = (step_parameters[i] for i in range(3))
    in_range = ops.logical_and(
        ops.greater_equal(step, begin), ops.less_equal(step, end)
    )
    on_turn = ops.logical_or(
        ops.equal(ops.mod(step - begin, frequency), 0), ops.equal(step, end)
    )
    return ops.logical_and(in_range, on_turn)


def _ranks(values, axis):
    """Each entry's rank along `axis` (0 = smallest), ties by position."""
    return ops.argsort(ops.argsort(values, axis=axis), axis=axis)


def magnitude_mask(kernel, sparsity):
    """1/0 mask zeroing the `round(sparsity * size)` smallest-magnitude weights.

    Examples:
        >>> import numpy as np
        >>> m = magnitude_mask(np.array([[0.1, -3.0], [2.0, -0.2]], "float32"), 0.5)
        >>> np.asarray(m).tolist()
        [[0.0, 1.0], [1.0, 0.0]]
    """
    kernel = ops.convert_to_tensor(kernel)
    flat = ops.reshape(ops.abs(kernel), (-1,))
    size = int(np.prod(kernel.shape))
    num_zero = ops.cast(ops.round(ops.cast(sparsity, "float32") * size), "int32")
    keep = ops.greater_equal(_ranks(flat, 0), num_zero)
    return ops.reshape(ops.cast(keep, kernel.dtype), kernel.shape)


def n_of_m_mask(kernel, n, m, axis=-2):
    """1/0 mask zeroing the `n` smallest of every `m` consecutive weights on `axis`.

    Examples:
        >>> import numpy as np
        >>> w = np.array([[4.0], [-1.0], [0.5], [3.0]], "float32")  # [in=4, out=1]
        >>> np.asarray(n_of_m_mask(w, 2, 4)).ravel().tolist()
        [1.0, 0.0, 0.0, 1.0]
    """
    kernel = ops.convert_to_tensor(kernel)
    moved = ops.moveaxis(ops.abs(kernel), axis, -1)
    moved_shape = moved.shape
    if moved_shape[-1] % m:
        raise ValueError(
            f"{n}:{m} pruning needs the input-channel axis to be a multiple of "
            f"{m}, got {moved_shape[-1]} channels."
        )
    groups = ops.reshape(moved, (-1, m))
    keep = ops.greater_equal(_ranks(groups, -1), n)
    mask = ops.reshape(ops.cast(keep, kernel.dtype), moved_shape)
    return ops.moveaxis(mask, -1, axis)


def holds_n_of_m(values, n, m, axis=-1):
    """True when every group of `m` consecutive entries on `axis` has >= `n` zeros (NumPy)."""
    moved = np.moveaxis(np.asarray(values), axis, -1)
    if moved.shape[-1] % m:
        return False
    groups = moved.reshape(-1, m)
    return bool(np.all(np.sum(groups == 0, axis=-1) >= n))
