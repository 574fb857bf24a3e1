"""`PrunedLayer`: a Conv/Dense layer whose kernels are magnitude-pruned in training."""

import keras
import numpy as np
from keras import ops

from qat_plugin.registry import linear_class_names, linear_op_for
from qat_plugin.config.constants import UNSTRUCTURED
from qat_plugin.sparsity import (
    ConstantSparsity,
    PruningSchedule,
    format_structure,
    is_update_step,
    magnitude_mask,
    n_of_m_mask,
    parse_structure,
    scheduled_sparsity,
)

# The kernel axis N:M groups run along: input channels, second to last in
# every Keras Conv/Dense kernel ([in, out], [*k, in, out], [*k, in, mult]).
INPUT_CHANNEL_AXIS = -2


class _KeepMasked:
    """A variable constraint: the layer's own constraint, then the mask.

    Keras optimizers apply a variable's constraint after every update, so
    momentum, Adam moments and weight decay can never move a pruned weight
    away from exactly zero in the stored kernel.
    """

    def __init__(self, mask, constraint=None):
        self.mask = mask
        self.constraint = constraint

    def __call__(self, kernel):
        if self.constraint is not None:
            kernel = self.constraint(kernel)
        return kernel * ops.convert_to_tensor(self.mask)


@keras.saving.register_keras_serializable(package="qat_plugin")
class PrunedLayer(keras.layers.Layer):
    """Wraps a Conv/Dense layer and prunes its kernels by magnitude while it trains.

    Each kernel has a non-trainable 0/1 mask variable of its shape. At the
    schedule's update steps (counted by the layer's own step variable, in
    the graph: no retrace, exact with `steps_per_execution > 1`) the mask is
    recomputed from the kernel's magnitudes: the smallest weights up to the
    scheduled sparsity, or the N smallest of every M consecutive input
    channels. The forward pass uses `kernel * mask` (so pruned weights get
    no gradient), and the kernel variable carries a constraint that
    multiplies it by the mask after every optimizer update, so the stored
    pruned weights stay exactly zero under momentum and weight decay (on
    the JAX backend, whose optimizer cannot read the mask, the stored
    values may drift until `PruningScheduler` zeroes them at the end of
    `fit`, but every use of the kernel is masked).

    `qat_plugin.quantize_model` turns a `PrunedLayer` into a
    `QuantizedLinear` that keeps its masks (pruning-preserving QAT);
    `qat_plugin.strip_pruning` turns it back into the plain layer with
    zeros in its kernel.

    Args:
        layer: a Dense, Conv1D/2D/3D, DepthwiseConv1D/2D or
            SeparableConv1D/2D layer (exact class).
        schedule: a `ConstantSparsity` or `PolynomialDecay`. For N:M
            structure only a `ConstantSparsity` of `N / M` (or None) fits:
            the pattern fixes the sparsity; the schedule's steps say when
            masks update.
        structure: `"unstructured"` or `"N:M"` (N zeros in every M
            consecutive weights along the input channels, e.g. `"2:4"`).

    Examples:
        >>> import numpy as np
        >>> from qat_plugin.sparsity import ConstantSparsity
        >>> layer = PrunedLayer(keras.layers.Dense(4), ConstantSparsity(0.75))
        >>> _ = layer(np.ones((2, 8), "float32"), training=True)
        >>> layer.sparsity()
        0.75
    """

    def __init__(self, layer, schedule=None, structure=UNSTRUCTURED, **kwargs):
        kwargs.setdefault("name", layer.name)
        super().__init__(**kwargs)
        self.linear_op = linear_op_for(layer)
        if self.linear_op is None:
            raise ValueError(
                f"Layer '{layer.name}' ({type(layer).__name__}) has no kernel "
                "to prune: pruning applies to the classes "
                f"{linear_class_names()}. Leave it out of prune_model "
                f"(skip=['{layer.name}'])."
            )
        self.layer = layer
        self.pattern = parse_structure(structure)
        self.schedule = _layer_schedule(layer.name, schedule, self.pattern)

    @property
    def structure(self):
        return format_structure(self.pattern)

    @property
    def quantizes_as(self):
        """The layer whose registry row applies: the one pruned."""
        return self.layer

    # The transform reads these as it does on the wrapped layer.
    @property
    def activation(self):
        return self.layer.activation

    @property
    def data_format(self):
        return getattr(self.layer, "data_format", "channels_last")

    @property
    def kernel_names(self):
        return self.linear_op.kernel_names

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        if self.pattern is not None:
            n, m = self.pattern
            for name in self.kernel_names:
                channels = getattr(self.layer, name).shape[INPUT_CHANNEL_AXIS]
                if channels % m:
                    raise ValueError(
                        f"Layer '{self.layer.name}': {n}:{m} pruning groups "
                        f"the {name}'s input channels by {m}, but it has "
                        f"{channels}. Prune this layer unstructured or skip "
                        f"it (skip=['{self.layer.name}'])."
                    )
        self.pruning_step = self.add_weight(
            name="pruning_step",
            shape=(),
            dtype="int32",
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
        )
        self.pruning_steps = self.add_weight(
            name="pruning_steps",
            shape=(3,),
            dtype="int32",
            initializer=keras.initializers.Constant(self.schedule.step_parameters()),
            trainable=False,
        )
        self.pruning_sparsity = self.add_weight(
            name="pruning_sparsity",
            shape=(3,),
            dtype="float32",
            initializer=keras.initializers.Constant(
                self.schedule.sparsity_parameters()
            ),
            trainable=False,
        )
        self.masks = []
        for name in self.kernel_names:
            kernel = getattr(self.layer, name)
            mask = self.add_weight(
                name=f"{name}_mask",
                shape=kernel.shape,
                dtype=kernel.dtype,
                initializer="ones",
                trainable=False,
                aggregation="only_first_replica",
            )
            # JAX applies constraints in a stateless scope that holds only
            # trainable and optimizer variables, so the mask cannot be read
            # there; the forward pass, export and strip_pruning all multiply
            # by the mask, so pruned weights stay zero in effect.
            if keras.backend.backend() != "jax":
                kernel.constraint = _KeepMasked(mask, kernel.constraint)
            self.masks.append(mask)

    def set_schedule(self, schedule):
        """Writes `schedule` into the layer's schedule variables (no retrace)."""
        self.schedule = _layer_schedule(self.layer.name, schedule, self.pattern)
        self.pruning_steps.assign(self.schedule.step_parameters())
        self.pruning_sparsity.assign(self.schedule.sparsity_parameters())

    def target_sparsity(self):
        """The schedule's sparsity at the current step (a float tensor)."""
        return scheduled_sparsity(
            ops.convert_to_tensor(self.pruning_step),
            ops.convert_to_tensor(self.pruning_steps),
            ops.convert_to_tensor(self.pruning_sparsity),
        )

    def _mask_for(self, kernel, sparsity):
        if self.pattern is None:
            return magnitude_mask(kernel, sparsity)
        return n_of_m_mask(kernel, *self.pattern, axis=INPUT_CHANNEL_AXIS)

    def update_masks(self):
        """Recomputes the masks at an update step; advances the step counter."""
        step = ops.convert_to_tensor(self.pruning_step)
        update = is_update_step(step, ops.convert_to_tensor(self.pruning_steps))
        sparsity = self.target_sparsity()
        for name, mask in zip(self.kernel_names, self.masks):
            kernel = ops.convert_to_tensor(getattr(self.layer, name))
            current = ops.convert_to_tensor(mask)
            mask.assign(
                ops.cond(
                    update,
                    lambda k=kernel: self._mask_for(k, sparsity),
                    lambda c=current: c,
                )
            )
        self.pruning_step.assign_add(1)

    def masked_kernels(self):
        """The kernels times their masks, in `kernel_names` order."""
        return [
            ops.convert_to_tensor(getattr(self.layer, name))
            * ops.convert_to_tensor(mask)
            for name, mask in zip(self.kernel_names, self.masks)
        ]

    def zero_pruned_weights(self):
        """Multiplies the stored kernels by their masks (eagerly)."""
        for name, kernel in zip(self.kernel_names, self.masked_kernels()):
            getattr(self.layer, name).assign(kernel)

    def stripped_weights(self):
        """The wrapped layer's weights as NumPy arrays, pruned weights zeroed."""
        masked = {
            id(getattr(self.layer, name)): ops.convert_to_numpy(mask)
            for name, mask in zip(self.kernel_names, self.masks)
        }
        return [
            ops.convert_to_numpy(w) * masked[id(w)] if id(w) in masked
            else ops.convert_to_numpy(w)
            for w in self.layer.weights
        ]

    def sparsity(self):
        """The fraction of this layer's kernel weights that are masked out."""
        zeros = sum(
            int(np.sum(ops.convert_to_numpy(m) == 0)) for m in self.masks
        )
        return zeros / sum(int(np.prod(m.shape)) for m in self.masks)

    def call(self, inputs, training=False):
        if training:
            self.update_masks()
        outputs = self.linear_op.apply(
            self.layer, inputs, self.masked_kernels(), lambda x: x
        )
        bias = self.linear_op.bias(self.layer)
        if bias is not None:
            outputs = self.linear_op.add_channel_vector(self.layer, outputs, bias)
        return self.layer.activation(outputs)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "layer": keras.saving.serialize_keras_object(self.layer),
                "schedule": keras.saving.serialize_keras_object(self.schedule),
                "structure": self.structure,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["layer"] = keras.saving.deserialize_keras_object(config["layer"])
        config["schedule"] = keras.saving.deserialize_keras_object(config["schedule"])
        return cls(**config)


def _layer_schedule(layer_name, schedule, pattern):
    """Checks `schedule` against the structure; the default for N:M."""
    if pattern is not None:
        n, m = pattern
        if schedule is None:
            return ConstantSparsity(n / m)
        if not isinstance(schedule, ConstantSparsity) or not np.isclose(
            schedule.sparsity, n / m
        ):
            raise ValueError(
                f"Layer '{layer_name}': {n}:{m} structure fixes the sparsity "
                f"at {n / m:g}; the schedule can only say when masks update: "
                f"pass ConstantSparsity({n / m:g}, begin_step=..., ...), not "
                f"{schedule!r}."
            )
        return schedule
    if schedule is None:
        raise ValueError(
            f"Layer '{layer_name}': unstructured pruning needs a schedule "
            "(ConstantSparsity or PolynomialDecay) or a sparsity."
        )
    if not isinstance(schedule, PruningSchedule):
        raise TypeError(
            f"Layer '{layer_name}': schedule must be a ConstantSparsity or "
            f"PolynomialDecay, got {type(schedule).__name__}."
        )
    return schedule

