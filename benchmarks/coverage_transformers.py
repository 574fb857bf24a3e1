"""Attention models and keras-hub backbones for benchmarks/coverage.py.

Random weights, built small from constructor arguments (presets download).
Each builder takes the image side (image models) and returns a float model
with fixed input shapes; `SAMPLES` makes inputs for the token and audio
models (the others take noise images, as the rest of the coverage run).

- KerasIOTextTransformer: keras.io's "Text classification with
  Transformer" block (MultiHeadAttention, a Sequential feed-forward,
  LayerNormalization, Dropout) on keras-hub's TokenAndPositionEmbedding.
- AttentionBlock: a pre-norm MultiHeadAttention block on a sequence.
- MobileViT: keras.io's MobileViT, shrunk (one MobileViT block with two
  transformer layers over unfolded 4-D patches).
- BERT, DistilBERT: keras-hub backbones (token ids, segment ids, a padding
  mask), pooled into a 4-class head.
- WhisperEncoder: keras-hub Whisper's audio encoder (Conv1D, GELU,
  attention blocks) on 8 mel bins.
- ViT, DeiT, MiT: keras-hub vision transformers (patch embeddings,
  encoder blocks, MiT's overlapping patches and spatial reduction).
- MobileNetV3Hub, EfficientNetHub, ResNetHub: keras-hub conv backbones
  (their squeeze-and-excite and block layers are composite layers).
"""

import keras
import numpy as np
from keras import layers as L

SEQUENCE = 16
VOCABULARY = 100


def _hub():
    import keras_hub

    return keras_hub


def _pooled(inputs, sequence, classes=4):
    return keras.Model(inputs, L.Dense(classes)(L.GlobalAveragePooling1D()(sequence)))


@keras.saving.register_keras_serializable(package="coverage")
class TransformerBlock(L.Layer):
    """keras.io's TransformerBlock (text classification with Transformer)."""

    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1, **kwargs):
        super().__init__(**kwargs)
        self.att = L.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.ffn = keras.Sequential([L.Dense(ff_dim, activation="relu"), L.Dense(embed_dim)])
        self.layernorm1 = L.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = L.LayerNormalization(epsilon=1e-6)
        self.dropout1 = L.Dropout(rate)
        self.dropout2 = L.Dropout(rate)

    def call(self, inputs):
        attn_output = self.dropout1(self.att(inputs, inputs))
        out1 = self.layernorm1(inputs + attn_output)
        ffn_output = self.dropout2(self.ffn(out1))
        return self.layernorm2(out1 + ffn_output)


def keras_io_text_transformer(side):
    inputs = keras.Input((SEQUENCE,), dtype="int32")
    x = _hub().layers.TokenAndPositionEmbedding(VOCABULARY, SEQUENCE, 16)(inputs)
    x = TransformerBlock(16, 2, 32)(x)
    return _pooled(inputs, x, classes=2)


def attention_block(side):
    inputs = keras.Input((SEQUENCE, 16))
    h = L.LayerNormalization()(inputs)
    x = L.Add()([inputs, L.MultiHeadAttention(2, 8)(h, h)])
    return _pooled(inputs, x)


def _swish_conv(x, filters, kernel_size=3, strides=1):
    return L.Conv2D(filters, kernel_size, strides=strides, padding="same",
                    activation=keras.activations.swish)(x)


def _vit_mlp(x, units):
    for width in units:
        x = L.Dropout(0.1)(L.Dense(width, activation=keras.activations.swish)(x))
    return x


def mobilevit(side, patch_size=4, projection_dim=16):
    """keras.io's MobileViT (XXS-style, shrunk): conv stem, a MobileViT block
    (local convs, unfold with Reshape, transformer blocks of
    MultiHeadAttention over 4-D patches, fold, fuse), pooled head."""
    inputs = keras.Input((side, side, 3))
    x = _swish_conv(inputs, 16, strides=2)
    local = _swish_conv(_swish_conv(x, projection_dim), projection_dim, kernel_size=1)
    patches = int(local.shape[1] * local.shape[2] / patch_size)
    y = L.Reshape((patch_size, patches, projection_dim))(local)
    for _ in range(2):
        h = L.LayerNormalization(epsilon=1e-6)(y)
        h = L.MultiHeadAttention(num_heads=2, key_dim=projection_dim, dropout=0.1)(h, h)
        h = L.Add()([h, y])
        y = L.Add()([_vit_mlp(L.LayerNormalization(epsilon=1e-6)(h),
                              [2 * projection_dim, projection_dim]), h])
    y = L.Reshape((*local.shape[1:-1], projection_dim))(y)
    y = _swish_conv(y, x.shape[-1], kernel_size=1)
    x = _swish_conv(L.Concatenate(axis=-1)([x, y]), projection_dim)
    return keras.Model(inputs, L.Dense(10)(L.GlobalAveragePooling2D()(x)))


def _text(backbone, names):
    inputs = {name: keras.Input((SEQUENCE,), dtype="int32", name=name) for name in names}
    outputs = backbone(inputs)
    return _pooled(inputs, outputs["sequence_output"] if isinstance(outputs, dict)
                   else outputs)


def bert(side):
    backbone = _hub().models.BertBackbone(
        vocabulary_size=VOCABULARY, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=SEQUENCE)
    return _text(backbone, ["token_ids", "segment_ids", "padding_mask"])


def distilbert(side):
    backbone = _hub().models.DistilBertBackbone(
        vocabulary_size=VOCABULARY, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=SEQUENCE)
    return _text(backbone, ["token_ids", "padding_mask"])


def whisper_encoder(side):
    backbone = _hub().models.WhisperBackbone(
        vocabulary_size=VOCABULARY, num_layers=1, num_heads=2, hidden_dim=16,
        intermediate_dim=32, num_mels=8, max_encoder_sequence_length=2 * SEQUENCE,
        max_decoder_sequence_length=8)
    encoder = keras.Model(backbone.input["encoder_features"],
                          backbone.output["encoder_sequence_output"])
    inputs = keras.Input((2 * SEQUENCE, 8))
    return _pooled(inputs, encoder(inputs))


def _image_head(backbone, side):
    inputs = keras.Input((side, side, 3))
    x = backbone(inputs)
    pool = L.GlobalAveragePooling1D() if len(x.shape) == 3 else L.GlobalAveragePooling2D()
    return keras.Model(inputs, L.Dense(10)(pool(x)))


def vit(side):
    return _image_head(_hub().models.ViTBackbone(
        image_shape=(side, side, 3), patch_size=8, num_layers=2, num_heads=2,
        hidden_dim=16, mlp_dim=32), side)


def deit(side):
    return _image_head(_hub().models.DeiTBackbone(
        image_shape=(side, side, 3), patch_size=8, num_layers=2, num_heads=2,
        hidden_dim=16, intermediate_dim=32), side)


def mit(side):
    return _image_head(_hub().models.MiTBackbone(
        layerwise_depths=[1, 1], num_layers=2, layerwise_num_heads=[1, 2],
        layerwise_sr_ratios=[2, 1], max_drop_path_rate=0.0, hidden_dims=[8, 16],
        image_shape=(side, side, 3), layerwise_patch_sizes=[7, 3],
        layerwise_strides=[4, 2]), side)


def mobilenet_v3(side):
    return _image_head(_hub().models.MobileNetBackbone(
        stackwise_expansion=[[1], [4]], stackwise_num_blocks=[1, 1],
        stackwise_num_filters=[[8], [16]], stackwise_kernel_size=[[3], [3]],
        stackwise_num_strides=[[2], [2]], stackwise_se_ratio=[[0.25], [None]],
        stackwise_activation=[["relu"], ["hard_swish"]], stackwise_padding=[[1], [1]],
        output_num_filters=32, depthwise_filters=8, depthwise_stride=2,
        depthwise_residual=False, squeeze_and_excite=0.5, last_layer_filter=32,
        image_shape=(side, side, 3)), side)


def efficientnet(side):
    return _image_head(_hub().models.EfficientNetBackbone(
        stackwise_width_coefficients=None, width_coefficient=0.25,
        depth_coefficient=0.25, stackwise_kernel_sizes=[3, 3],
        stackwise_num_repeats=[1, 1], stackwise_input_filters=[32, 16],
        stackwise_output_filters=[16, 24], stackwise_expansion_ratios=[1, 6],
        stackwise_strides=[1, 2], stackwise_squeeze_and_excite_ratios=[0.25, 0.25],
        stackwise_block_types=["v1", "v1"], image_shape=(side, side, 3),
        include_rescaling=False), side)


def resnet(side):
    return _image_head(_hub().models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 32], stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2], block_type="basic_block",
        image_shape=(side, side, 3)), side)


MODELS = {
    "KerasIOTextTransformer": keras_io_text_transformer,
    "AttentionBlock": attention_block,
    "MobileViT": mobilevit,
    "BERT": bert,
    "DistilBERT": distilbert,
    "WhisperEncoder": whisper_encoder,
    "ViT": vit,
    "DeiT": deit,
    "MiT": mit,
    "MobileNetV3Hub": mobilenet_v3,
    "EfficientNetHub": efficientnet,
    "ResNetHub": resnet,
}


def _tokens(model, count, seed):
    """Token ids in 1..VOCABULARY-1 with the last 4 positions padding."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for tensor in model.inputs:
        name = tensor.name
        if "mask" in name:
            values = np.ones((count, SEQUENCE), "int32")
            values[:, -4:] = 0
        elif "segment" in name:
            values = np.zeros((count, SEQUENCE), "int32")
        else:
            values = rng.integers(1, VOCABULARY, (count, SEQUENCE)).astype("int32")
        inputs[name] = values
    return inputs if len(inputs) > 1 else next(iter(inputs.values()))


def _features(model, count, seed):
    shape = (count,) + tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


SAMPLES = {
    "KerasIOTextTransformer": _tokens,
    "BERT": _tokens,
    "DistilBERT": _tokens,
    "AttentionBlock": _features,
    "WhisperEncoder": _features,
}
