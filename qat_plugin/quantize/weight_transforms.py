"""Weight transforms: what a fold does to a Conv/Dense layer's weights.

Each is a function of the layer's `get_weights()` list returning the list
to set on its quantized copy, so the folded constants are trained (and
exported) as the converter would fold them.
"""

import numpy as np


def scaled_weights(scale):
    """Scales a Conv/Dense's output channels: kernel and bias times `scale`."""

    def transform(weights):
        return [w * scale for w in weights]

    return transform


def scaled_kernel(scale):
    """Multiplies a linear layer's kernel (its first weight) by scalar `scale`."""

    def transform(weights):
        return [weights[0] * scale] + list(weights[1:])

    return transform


def composed(*transforms):
    """Applies the weight transforms that are not None, left to right."""
    transforms = [t for t in transforms if t is not None]
    if not transforms:
        return None

    def transform(weights):
        for step in transforms:
            weights = step(weights)
        return weights

    return transform


def shifted_bias(constant):
    """Adds `constant` to a Conv/Dense's bias (weights `[kernel, bias]`)."""

    def transform(weights):
        bias = weights[1] + constant
        if bias.size > 1 and np.all(bias == bias.flat[0]) and bias.flat[0] != 0:
            # The converter quantizes a bias whose values are all equal (a
            # "splat" constant, e.g. a zero bias plus 3) with the first
            # channel's scale only, which corrupts every other channel
            # (measured). One ulp off on one channel keeps it a plain tensor.
            bias = bias.copy()
            bias.flat[-1] = np.nextafter(bias.flat[-1], np.inf, dtype=bias.dtype)
        return [weights[0], bias] + list(weights[2:])

    return transform
