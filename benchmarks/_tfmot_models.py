"""The benchmark architectures, built from either Keras 3 or tf_keras.

Each builder takes the Keras module (`keras` or `tf_keras`) so that the
Keras 3 model and its tf_keras twin (for tfmot) have the same layers, names
and weight order; weights move between them layer by layer by name
(`layer_weights` / `set_layer_weights`), saved as `.npz`.
"""

import numpy as np

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def _conv_bn(L, x, filters, kernel, strides, name, activation):
    x = L.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                 name=f"{name}_conv")(x)
    x = L.BatchNormalization(name=f"{name}_bn")(x)
    if activation == "relu6":
        x = L.ReLU(6.0, name=f"{name}_relu6")(x)
    elif activation == "relu":
        x = L.ReLU(name=f"{name}_relu")(x)
    return x


def _inverted_residual(L, x, expansion, filters, strides, name):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 linear project."""
    channels = x.shape[-1]
    y = _conv_bn(L, x, channels * expansion, 1, 1, f"{name}_expand", "relu6")
    y = L.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False,
                          name=f"{name}_dw")(y)
    y = L.BatchNormalization(name=f"{name}_dw_bn")(y)
    y = L.ReLU(6.0, name=f"{name}_dw_relu6")(y)
    y = _conv_bn(L, y, filters, 1, 1, f"{name}_project", None)
    if strides == 1 and channels == filters:
        y = L.Add(name=f"{name}_add")([x, y])
    return y


def mobilenet_v2(keras_module):
    """A small MobileNetV2: depthwise convs, BN, ReLU6, inverted residual adds."""
    L = keras_module.layers
    inputs = keras_module.Input(INPUT_SHAPE, name="image")
    x = _conv_bn(L, inputs, 16, 3, 2, "stem", "relu6")            # 14x14
    x = _inverted_residual(L, x, 1, 16, 1, "block1")               # add
    x = _inverted_residual(L, x, 4, 24, 2, "block2")               # 7x7
    x = _inverted_residual(L, x, 4, 24, 1, "block3")               # add
    x = _inverted_residual(L, x, 4, 32, 1, "block4")
    x = _inverted_residual(L, x, 4, 32, 1, "block5")               # add
    x = _conv_bn(L, x, 96, 1, 1, "head", "relu6")
    x = L.GlobalAveragePooling2D(name="pool")(x)
    outputs = L.Dense(NUM_CLASSES, name="logits")(x)
    return keras_module.Model(inputs, outputs, name="mobilenet_v2_small")


def _basic_block(L, x, filters, strides, name):
    """ResNet's basic block: two 3x3 conv-BN, identity or 1x1 projection."""
    y = _conv_bn(L, x, filters, 3, strides, f"{name}_a", "relu")
    y = _conv_bn(L, y, filters, 3, 1, f"{name}_b", None)
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(L, x, filters, 1, strides, f"{name}_proj", None)
    x = L.Add(name=f"{name}_add")([shortcut, y])
    return L.ReLU(name=f"{name}_out")(x)


def resnet_small(keras_module):
    """A small ResNet: 3x3 stem, two stages of basic blocks, GAP, Dense."""
    L = keras_module.layers
    inputs = keras_module.Input(INPUT_SHAPE, name="image")
    x = _conv_bn(L, inputs, 16, 3, 2, "stem", "relu")              # 14x14
    x = _basic_block(L, x, 16, 1, "stage1")
    x = _basic_block(L, x, 32, 2, "stage2")                        # 7x7
    x = L.GlobalAveragePooling2D(name="pool")(x)
    outputs = L.Dense(NUM_CLASSES, name="logits")(x)
    return keras_module.Model(inputs, outputs, name="resnet_small")


ARCHITECTURES = {"mobilenet_v2": mobilenet_v2, "resnet": resnet_small}


def layer_weights(model):
    """`{"<layer>/<index>": array}` for every layer with weights."""
    return {
        f"{layer.name}/{i}": np.asarray(w)
        for layer in model.layers
        for i, w in enumerate(layer.get_weights())
    }


def set_layer_weights(model, weights):
    """Sets weights saved by `layer_weights` on a model of the same architecture."""
    used = set()
    for layer in model.layers:
        count = len(layer.get_weights())
        if not count:
            continue
        keys = [f"{layer.name}/{i}" for i in range(count)]
        missing = [k for k in keys if k not in weights]
        if missing:
            raise KeyError(f"Layer '{layer.name}': no saved weights {missing}.")
        layer.set_weights([weights[k] for k in keys])
        used.update(keys)
    unused = set(weights) - used
    if unused:
        raise KeyError(f"Saved weights with no layer in '{model.name}': {sorted(unused)}.")


def finetune_schedule(schedules_module, learning_rate, steps):
    """The fine-tuning learning rate: cosine decay to a tenth, identical in both Kerases."""
    return schedules_module.CosineDecay(learning_rate, steps, alpha=0.1)


def median_step_ms(train_on_batch_pairs, x, y, steps, warmup, rounds=5):
    """Median per-step ms of several `train_on_batch` callables, interleaved.

    Each round runs `steps // rounds` steps of every callable in turn, so a
    change in machine load hits all of them alike; the ratios are the
    figures to read, not the absolute times.
    """
    import time

    for fn in train_on_batch_pairs.values():
        for _ in range(warmup):
            fn(x, y)
    times = {name: [] for name in train_on_batch_pairs}
    per_round = max(1, steps // rounds)
    for _ in range(rounds):
        for name, fn in train_on_batch_pairs.items():
            for _ in range(per_round):
                start = time.perf_counter()
                fn(x, y)
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * float(np.median(t)) for name, t in times.items()}
