"""Models beyond keras.applications for benchmarks/coverage.py.

Each builder takes the input side and returns a float model with random
weights: image models take `(side, side, 3)`, the audio model `(8 * side,
1)` samples. Classifiers end in a 10-class logit head; the autoencoder and
the U-Net keep their image-shaped outputs.

- ConvAutoencoder: strided Conv2D encoder, Conv2DTranspose decoder.
- UNet: two levels, Conv2DTranspose + BatchNormalization + ReLU up,
  skip concatenations, a 1x1 segmentation head.
- CSPDarkNet: keras-hub's `CSPNetBackbone` with CSP stages (the ops.split
  cross-stage blocks), built small from constructor arguments.
- SpeakerRecognition: keras.io's speaker-recognition Conv1D net (residual
  blocks of Conv1D with an Add shortcut, MaxPool1D, AveragePooling1D,
  Dense), with its filters.
- PReLUNet, ResizingNet, UpSamplingBilinear, LambdaHardSwish: small nets
  built around PReLU, Resizing (bilinear and nearest), UpSampling2D
  bilinear and a Lambda computing hard swish with keras.ops.
"""

import keras
from keras import layers as L
from keras import ops


def _classifier(inputs, x):
    return keras.Model(inputs, L.Dense(10)(L.GlobalAveragePooling2D()(x)))


def conv_autoencoder(side):
    inputs = keras.Input((side, side, 3))
    x = L.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inputs)
    x = L.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = L.Conv2DTranspose(32, 3, strides=2, padding="same", activation="relu")(x)
    x = L.Conv2DTranspose(16, 3, strides=2, padding="same", activation="relu")(x)
    return keras.Model(inputs, L.Conv2D(3, 3, padding="same", activation="sigmoid")(x))


def _conv_bn_relu(x, filters):
    x = L.Conv2D(filters, 3, padding="same", use_bias=False)(x)
    return L.ReLU()(L.BatchNormalization()(x))


def unet(side):
    inputs = keras.Input((side, side, 3))
    skips, x = [], inputs
    for filters in (16, 32):
        x = _conv_bn_relu(x, filters)
        skips.append(x)
        x = L.MaxPooling2D()(x)
    x = _conv_bn_relu(x, 64)
    for filters, skip in zip((32, 16), reversed(skips)):
        x = L.Conv2DTranspose(filters, 3, strides=2, padding="same", use_bias=False)(x)
        x = L.ReLU()(L.BatchNormalization()(x))
        x = _conv_bn_relu(L.Concatenate()([skip, x]), filters)
    return keras.Model(inputs, L.Conv2D(10, 1)(x))


def cspdarknet(side):
    import keras_hub

    backbone = keras_hub.models.CSPNetBackbone(
        stem_filters=16, stem_kernel_size=3, stem_strides=2,
        stackwise_depth=[1, 2], stackwise_strides=[2, 2],
        stackwise_num_filters=[32, 64], block_type="dark_block",
        stage_type="csp", expand_ratio=[2.0, 1.0], bottle_ratio=[0.5, 1.0],
        block_ratio=[1.0, 0.5], down_growth=True, image_shape=(side, side, 3),
    )
    inputs = keras.Input((side, side, 3))
    return _classifier(inputs, backbone(inputs))


def speaker_recognition(side):
    def residual_block(x, filters, convs):
        shortcut = L.Conv1D(filters, 1, padding="same")(x)
        for _ in range(convs - 1):
            x = L.Activation("relu")(L.Conv1D(filters, 3, padding="same")(x))
        x = L.Add()([L.Conv1D(filters, 3, padding="same")(x), shortcut])
        return L.MaxPool1D(pool_size=2, strides=2)(L.Activation("relu")(x))

    inputs = keras.Input((8 * side, 1))
    x = inputs
    for filters, convs in ((16, 2), (32, 2), (64, 3), (128, 3), (128, 3)):
        x = residual_block(x, filters, convs)
    x = L.Flatten()(L.AveragePooling1D(pool_size=3, strides=3)(x))
    x = L.Dense(128, activation="relu")(L.Dense(256, activation="relu")(x))
    return keras.Model(inputs, L.Dense(10)(x))


def prelu_net(side):
    inputs = keras.Input((side, side, 3))
    x = L.PReLU(shared_axes=[1, 2])(L.Conv2D(16, 3, strides=2, padding="same")(inputs))
    x = L.PReLU()(L.Conv2D(32, 3, strides=2, padding="same")(x))
    return _classifier(inputs, x)


def resizing_net(side):
    inputs = keras.Input((side, side, 3))
    x = L.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inputs)
    x = L.Resizing(side, side)(x)
    x = L.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    x = L.Resizing(side // 2 + 4, side // 2 + 4, interpolation="nearest")(x)
    return _classifier(inputs, L.Conv2D(32, 3, activation="relu")(x))


def upsampling_bilinear(side):
    inputs = keras.Input((side, side, 3))
    fine = L.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    coarse = L.Conv2D(16, 3, strides=2, padding="same", activation="relu")(fine)
    up = L.UpSampling2D(interpolation="bilinear")(coarse)
    return _classifier(inputs, L.Conv2D(16, 3, activation="relu")(L.Add()([fine, up])))


def lambda_hard_swish(side):
    inputs = keras.Input((side, side, 3))
    x = L.Conv2D(16, 3, strides=2, padding="same")(inputs)
    x = L.Lambda(lambda t: t * ops.relu6(t + 3.0) * (1.0 / 6.0))(x)
    x = L.Conv2D(32, 3, strides=2, padding="same")(x)
    x = L.Lambda(lambda t: ops.maximum(t, 0.0) + ops.mean(t, axis=-1, keepdims=True))(x)
    return _classifier(inputs, x)


# name: builder(side) -> model
MODELS = {
    "ConvAutoencoder": conv_autoencoder,
    "UNet": unet,
    "CSPDarkNet": cspdarknet,
    "SpeakerRecognition": speaker_recognition,
    "PReLUNet": prelu_net,
    "ResizingNet": resizing_net,
    "UpSamplingBilinear": upsampling_bilinear,
    "LambdaHardSwish": lambda_hard_swish,
}
