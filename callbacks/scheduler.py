"""`QuantizationScheduler`: when fake-quant starts, BN and ranges freeze."""

import math
import numbers

import keras
from keras import ops

from qat_plugin.layers.base import quantized_layers
from qat_plugin.config.constants import NEVER, SCHEDULE_POINTS, UNITS, check_freeze_points



def calls_per_step(model):
    """Returns, per quantized layer of `model`, its calls in one forward pass.

    A shared layer runs (and counts `qat_step`) once per call, so its step
    thresholds are scaled by this number.
    """
    counts = {id(layer): 0 for layer in quantized_layers(model)}
    nodes_by_depth = getattr(model, "_nodes_by_depth", None) or {}
    for nodes in nodes_by_depth.values():
        for node in nodes:
            if id(node.operation) in counts:
                counts[id(node.operation)] += 1
    return {key: max(count, 1) for key, count in counts.items()}


def current_phase(model):
    """Returns the schedule phase of `model`'s most recent training step.

    Read from the quantized layers' `qat_step` and `qat_schedule` variables
    (before any training: the phase of the first step). A flag is true when
    it holds for every quantized layer.

    Returns:
        A dict with `step` (training steps taken, an int) and the booleans
        `quantizing` (fake-quant on), `bn_frozen` and `ranges_frozen`.

    Examples:
        >>> import keras, qat_plugin
        >>> from qat_plugin.callbacks import current_phase
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> current_phase(qat_plugin.quantize_model(model))
        {'step': 0, 'quantizing': True, 'bn_frozen': False, 'ranges_frozen': False}
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(
            f"Model '{model.name}' has no quantized layers; pass the model "
            "returned by qat_plugin.quantize_model."
        )
    calls = calls_per_step(model)
    steps, flags = [], []
    for layer in layers:
        taken = int(ops.convert_to_numpy(layer.qat_step))
        schedule = ops.convert_to_numpy(layer.qat_schedule)
        last_call = max(taken - 1, 0)
        steps.append(taken // calls[id(layer)])
        flags.append([last_call >= int(point) for point in schedule])
    return {
        "step": min(steps),
        "quantizing": all(f[0] for f in flags),
        "bn_frozen": all(f[1] for f in flags),
        "ranges_frozen": all(f[2] for f in flags),
    }


def _check_point(name, value, unit):
    if value is None:
        return
    if unit == "step":
        valid = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        expected = "an int (a step)"
    else:
        valid = isinstance(value, numbers.Real) and not isinstance(value, bool)
        valid = valid and math.isfinite(value)
        expected = "a number of epochs (int or float)"
    if not valid:
        raise TypeError(
            f"QuantizationScheduler: {name} must be None or {expected} with "
            f"unit={unit!r}, got {value!r}."
        )
    if value < 0:
        raise ValueError(
            f"QuantizationScheduler: {name}={value!r} is negative; schedule "
            "points count from the quantized model's first training step and "
            "must be >= 0."
        )


@keras.saving.register_keras_serializable(package="qat_plugin")
class QuantizationScheduler(keras.callbacks.Callback):
    """Schedules fake-quant, BatchNorm freezing and range freezing in `fit`.

    The QAT schedule of Jacob et al. (2018) and Krishnamoorthi (2018): until
    `quantize_start` the activation observers learn their ranges while the
    model still computes in float; from `quantize_start` weights and
    activations are fake-quantized; from `bn_freeze` the BatchNorm moving
    statistics stop updating and folding uses them; from `range_freeze` the
    activation ranges stop moving, so the last steps train against the
    scales that will be exported.

    Each quantized layer compares its own step counter (the `qat_step`
    variable) with thresholds held in its `qat_schedule` variable; this
    callback only writes the thresholds when training begins. The switches
    therefore happen inside the compiled train function, at the exact step,
    with no retrace, also with `steps_per_execution > 1` and under
    `tf.distribute`; validation and `predict` do not advance the counter.

    Points count training steps from the quantized model's first training
    step, not from the start of this `fit` call: the counter is a model
    variable, saved in `.keras` files and restored by
    `keras.callbacks.BackupAndRestore`, so a resumed or continued `fit`
    keeps the schedule. Epoch points become `round(epochs * steps_per_epoch)`
    steps, so fractional epochs are fine. For an exact resume use
    `BackupAndRestore(save_freq="epoch")`: with an integer `save_freq`,
    Keras restarts the interrupted epoch from its first batch with the
    mid-epoch weights, so the steps of that partial epoch count twice.

    Args:
        quantize_start: the first step (or epoch) that fake-quantizes.
        bn_freeze: the first step whose BatchNorm statistics stay frozen, or
            None for never.
        range_freeze: the first step whose activation ranges stay frozen,
            or None for never.
        unit: `"step"` or `"epoch"`.
        steps_per_epoch: steps per epoch, for epoch points when `fit` cannot
            know it (a dataset of unknown size); default: `fit`'s.

    Raises:
        ValueError: a negative point, a freeze before `quantize_start`, or
            (when `fit` knows its length) a point at or past the end of
            training.

    Examples:
        >>> import keras, numpy as np, qat_plugin
        >>> from qat_plugin.callbacks import QuantizationScheduler, current_phase
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> qat = qat_plugin.quantize_model(model)
        >>> qat.compile("sgd", "mse")
        >>> scheduler = QuantizationScheduler(quantize_start=2, range_freeze=3)
        >>> x, y = np.ones((8, 4), "float32"), np.zeros((8, 2), "float32")
        >>> _ = qat.fit(x, y, batch_size=2, epochs=1, verbose=0,
        ...             callbacks=[scheduler])
        >>> current_phase(qat)
        {'step': 4, 'quantizing': True, 'bn_frozen': False, 'ranges_frozen': True}
    """

    def __init__(
        self,
        quantize_start=0,
        bn_freeze=None,
        range_freeze=None,
        unit="step",
        steps_per_epoch=None,
    ):
        super().__init__()
        if unit not in UNITS:
            raise ValueError(
                f"QuantizationScheduler: unit must be one of {UNITS}, got "
                f"{unit!r}."
            )
        if quantize_start is None:
            raise ValueError(
                "QuantizationScheduler: quantize_start cannot be None; a QAT "
                "model always fake-quantizes eventually (use 0 to start at "
                "once)."
            )
        for name, value in zip(SCHEDULE_POINTS, (quantize_start, bn_freeze, range_freeze)):
            _check_point(name, value, unit)
        check_freeze_points(quantize_start, bn_freeze, range_freeze,
                            where="QuantizationScheduler: ")
        if steps_per_epoch is not None and (
            not isinstance(steps_per_epoch, numbers.Integral) or steps_per_epoch < 1
        ):
            raise ValueError(
                "QuantizationScheduler: steps_per_epoch must be a positive "
                f"int or None, got {steps_per_epoch!r}."
            )
        self.quantize_start = quantize_start
        self.bn_freeze = bn_freeze
        self.range_freeze = range_freeze
        self.unit = unit
        self.steps_per_epoch = steps_per_epoch

    def schedule_steps(self, steps_per_epoch=None):
        """Returns `[quantize_start, bn_freeze, range_freeze]` in steps.

        A point that never happens is `2**31 - 1`, as in `qat_schedule`.
        """
        points = (self.quantize_start, self.bn_freeze, self.range_freeze)
        if self.unit == "step":
            return [NEVER if p is None else min(int(p), NEVER) for p in points]
        steps_per_epoch = self.steps_per_epoch or steps_per_epoch
        if steps_per_epoch is None:
            raise ValueError(
                "QuantizationScheduler: the schedule is in epochs but the "
                "number of steps per epoch is unknown (a dataset of unknown "
                "size). Pass steps_per_epoch= to QuantizationScheduler or to "
                "fit()."
            )
        return [
            NEVER if p is None else min(round(p * steps_per_epoch), NEVER)
            for p in points
        ]

    def on_train_begin(self, logs=None):
        layers = quantized_layers(self.model)
        if not layers:
            raise ValueError(
                f"QuantizationScheduler: model '{self.model.name}' has no "
                "quantized layers; pass the model returned by "
                "qat_plugin.quantize_model."
            )
        steps_per_epoch = self.params.get("steps")
        schedule = self.schedule_steps(steps_per_epoch)
        self._check_end(schedule, steps_per_epoch)
        self._schedule = schedule
        self._settled = False

    def on_train_batch_begin(self, batch, logs=None):
        # Settled here, after every on_train_begin (BackupAndRestore may have
        # restored the step counters), before the first step runs.
        if self._settled:
            return
        self._settled = True
        steps_per_epoch = self.params.get("steps")
        epochs = self.params.get("epochs")
        # An upper bound on the steps this fit runs (a resumed fit runs fewer).
        steps_ahead = epochs * steps_per_epoch if epochs and steps_per_epoch else None
        calls = calls_per_step(self.model)
        for layer in quantized_layers(self.model):
            count = calls[id(layer)]
            layer.set_qat_schedule(
                [p if p == NEVER else min(p * count, NEVER) for p in self._schedule],
                steps_ahead=None if steps_ahead is None else steps_ahead * count,
            )
        # Trace the train function for the switches that can fire in this
        # fit only; the ones settled for its whole length are constants.
        self.model.make_train_function(force=True)

    def _check_end(self, schedule, steps_per_epoch):
        """Raises for points that this `fit` can never reach."""
        epochs = self.params.get("epochs")
        if not epochs or not steps_per_epoch:
            return
        end = current_phase(self.model)["step"] + epochs * steps_per_epoch
        for name, value, step in zip(
            SCHEDULE_POINTS, (self.quantize_start, self.bn_freeze, self.range_freeze), schedule
        ):
            if step != NEVER and step >= end:
                raise ValueError(
                    f"QuantizationScheduler: {name}={value!r} ({self.unit}s) "
                    f"is step {step}, at or past the end of training (step "
                    f"{end}: {epochs} epochs of {steps_per_epoch} steps), so "
                    "it would never happen. Choose an earlier point"
                    + (" or None." if name != "quantize_start" else ".")
                )

    def get_config(self):
        return {
            "quantize_start": self.quantize_start,
            "bn_freeze": self.bn_freeze,
            "range_freeze": self.range_freeze,
            "unit": self.unit,
            "steps_per_epoch": self.steps_per_epoch,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
