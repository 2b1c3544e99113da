"""Vision Transformer (Dosovitskiy et al. 2021) backbones, written in Keras, as a feature pyramid.

``vit_b16`` (ViT-B/16: width 768, 12 blocks, 12 heads, 86 M parameters) and ``vit_tiny``
(ViT-Ti/16: width 192, 12 blocks, 3 heads, 5.5 M; trains on a CPU), with timm's
layout and names so a converted timm checkpoint maps one tensor to one weight:

    patch_embed (Conv2D p x p, stride p) -> patch_tokens (reshape) -> cls_token -> pos_embed
    -> block0 .. block11 (pre-norm: x + attn(norm1(x)), x + mlp(norm2(x)); fused qkv)
    -> norm (LayerNormalization, eps 1e-6)

A ViT has one resolution, stride 16. Its pyramid (documented, parameter-free, so the
backbone holds exactly the ViT's weights): ``P4`` = the normed patch tokens reshaped to
their ``H/16 x W/16`` grid (``P4_map``; the class token is left out), ``P3`` = P4
resampled bilinearly to twice the size (``P3_upsample``), ``P5`` = P4 average-pooled 2x2
(``P5_pool``). There is no ``P2``.

Position embeddings are stored for the ImageNet grid (14 x 14 at 224 px) and resampled
bicubically to the input's grid in the forward pass (timm's ``resample_abs_pos_embed``),
so one weights file loads at any input size (TensorFlow's bicubic kernel, a = -0.5, is not
PyTorch's a = -0.75: at sizes other than 224 a converted checkpoint differs slightly from
timm there).
"""
from __future__ import annotations

import dataclasses

import keras
from keras import layers, ops

from .layers import ResizeTo


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    patch: int
    dim: int
    depth: int
    heads: int
    grid: int = 14          # position-embedding grid of the pretrained weights (224 / patch)
    mlp_ratio: float = 4.0
    preprocessing: str = "tf"   # timm's augreg ViTs normalise with mean = std = 0.5: [-1, 1]


CONFIGS = {"vit_b16": ViTConfig(16, 768, 12, 12), "vit_tiny": ViTConfig(16, 192, 12, 3)}
#: unfreezing stages: the embeddings, then the blocks in four equal groups
STAGES = ("stem", "stage1", "stage2", "stage3", "stage4")


@keras.saving.register_keras_serializable(package="btmtl")
class TransformerBlock(layers.Layer):
    """Pre-norm transformer block on tokens ``[..., N, dim]``: multi-head self-attention with a
    fused ``qkv`` projection, then a GELU MLP, each in a residual branch (timm's ``Block``)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads, self.mlp_ratio, self.epsilon = int(dim), int(heads), float(mlp_ratio), float(epsilon)
        self.norm1 = layers.LayerNormalization(epsilon=self.epsilon, name="norm1", dtype=self.dtype_policy)
        self.qkv = layers.Dense(3 * self.dim, name="qkv", dtype=self.dtype_policy)
        self.proj = layers.Dense(self.dim, name="proj", dtype=self.dtype_policy)
        self.norm2 = layers.LayerNormalization(epsilon=self.epsilon, name="norm2", dtype=self.dtype_policy)
        self.fc1 = layers.Dense(int(self.dim * self.mlp_ratio), activation="gelu", name="fc1",
                                dtype=self.dtype_policy)
        self.fc2 = layers.Dense(self.dim, name="fc2", dtype=self.dtype_policy)

    def build(self, input_shape):
        shape = tuple(input_shape)
        for sub in (self.norm1, self.norm2):
            sub.build(shape)
        self.qkv.build(shape)
        self.proj.build((*shape[:-1], self.dim))
        self.fc1.build(shape)
        self.fc2.build((*shape[:-1], int(self.dim * self.mlp_ratio)))
        self.built = True

    def attention(self, x, bias=None, mask=None):
        """Self-attention over ``x`` ``[B, N, dim]`` (already normed); ``bias`` ``[heads, N, N]``
        is added to every window's logits, ``mask`` ``[W, N, N]`` to window ``b % W``."""
        n, hd = x.shape[1], self.dim // self.heads
        qkv = ops.transpose(ops.reshape(self.qkv(x), (-1, n, 3, self.heads, hd)), (2, 0, 3, 1, 4))
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = ops.matmul(q * ops.cast(hd ** -0.5, q.dtype), ops.transpose(k, (0, 1, 3, 2)))
        if bias is not None:
            logits = logits + ops.cast(bias, logits.dtype)[None]
        if mask is not None:
            nw = mask.shape[0]
            logits = ops.reshape(logits, (-1, nw, self.heads, n, n)) + ops.cast(mask, logits.dtype)[None, :, None]
            logits = ops.reshape(logits, (-1, self.heads, n, n))
        # one token per window (a Swin stage on a 1x1 grid): the softmax is 1 (written so, the graph
        # keeps its zero gradient to q, k and the bias instead of a size-1 softmax warning)
        weights = ops.exp(logits - logits) if n == 1 else ops.softmax(logits, axis=-1)
        out = ops.matmul(weights, v)
        return self.proj(ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (-1, n, self.dim)))

    def mix(self, x):
        """The token-mixing branch (global attention here; windows in Swin)."""
        return self.attention(self.norm1(x))

    def call(self, x):
        x = x + self.mix(x)
        return x + self.fc2(self.fc1(self.norm2(x)))

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "heads": self.heads, "mlp_ratio": self.mlp_ratio,
                "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="btmtl")
class ClassToken(layers.Layer):
    """Prepend a learned class token: ``[B, N, D] -> [B, 1 + N, D]``."""

    def build(self, input_shape):
        self.token = self.add_weight(shape=(1, 1, int(input_shape[-1])), name="token",
                                     initializer=keras.initializers.RandomNormal(stddev=1e-6))
        self.built = True

    def call(self, x):
        t = ops.broadcast_to(ops.cast(self.token, x.dtype), (ops.shape(x)[0], 1, x.shape[-1]))
        return ops.concatenate([t, x], axis=1)

    def compute_output_shape(self, input_shape):
        n = None if input_shape[1] is None else input_shape[1] + 1
        return (input_shape[0], n, input_shape[2])


@keras.saving.register_keras_serializable(package="btmtl")
class PositionEmbedding(layers.Layer):
    """Learned absolute position embedding, stored for a ``grid x grid`` token grid (plus
    ``prefix`` class tokens) and resampled bicubically to ``token_grid`` when they differ."""

    def __init__(self, grid: int = 14, token_grid=(14, 14), prefix: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.grid, self.prefix = int(grid), int(prefix)
        self.token_grid = (int(token_grid[0]), int(token_grid[1]))

    def build(self, input_shape):
        self.embedding = self.add_weight(shape=(1, self.prefix + self.grid * self.grid, int(input_shape[-1])),
                                         name="embedding", initializer=keras.initializers.TruncatedNormal(stddev=0.02))
        self.built = True

    def call(self, x):
        pos = self.embedding
        if self.token_grid != (self.grid, self.grid):
            d = pos.shape[-1]
            patch = ops.reshape(pos[:, self.prefix:], (1, self.grid, self.grid, d))
            patch = ops.image.resize(patch, self.token_grid, interpolation="bicubic")
            pos = ops.concatenate([pos[:, :self.prefix], ops.reshape(patch, (1, -1, d))], axis=1)
        return x + ops.cast(pos, x.dtype)

    def get_config(self):
        return {**super().get_config(), "grid": self.grid, "token_grid": list(self.token_grid), "prefix": self.prefix}


@keras.saving.register_keras_serializable(package="btmtl")
class TokensToMap(layers.Layer):
    """``[B, prefix + h*w, D] -> [B, h, w, D]``: drop the prefix (class) tokens, restore the grid."""

    def __init__(self, grid, prefix: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.grid, self.prefix = (int(grid[0]), int(grid[1])), int(prefix)

    def call(self, x):
        return ops.reshape(x[:, self.prefix:], (-1, *self.grid, x.shape[-1]))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.grid, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "grid": list(self.grid), "prefix": self.prefix}


def vit(inputs, arch: str) -> keras.Model:
    """The ViT ``arch`` (a key of :data:`CONFIGS`) on ``inputs``; outputs ``[P3, P4, P5]``."""
    c = CONFIGS[arch]
    height, width = int(inputs.shape[1]), int(inputs.shape[2])
    h, w = height // c.patch, width // c.patch
    x = layers.Conv2D(c.dim, c.patch, strides=c.patch, padding="valid", name="patch_embed")(inputs)
    x = layers.Reshape((h * w, c.dim), name="patch_tokens")(x)
    x = ClassToken(name="cls_token")(x)
    x = PositionEmbedding(c.grid, (h, w), prefix=1, name="pos_embed")(x)
    for i in range(c.depth):
        x = TransformerBlock(c.dim, c.heads, c.mlp_ratio, name=f"block{i}")(x)
    x = layers.LayerNormalization(epsilon=1e-6, name="norm")(x)
    p4 = TokensToMap((h, w), prefix=1, name="P4_map")(x)
    p3 = ResizeTo((2 * h, 2 * w), name="P3_upsample")(p4)
    p5 = layers.AveragePooling2D(2, padding="same", name="P5_pool")(p4)
    return keras.Model(inputs, [p3, p4, p5], name=arch)


def vit_b16(inputs) -> keras.Model:
    return vit(inputs, "vit_b16")


def vit_tiny(inputs) -> keras.Model:
    return vit(inputs, "vit_tiny")


def stage_rule(depth: int, stages: int = 4):
    """Layer name -> stage: the embedding layers are ``stem``; blocks in ``stages`` equal
    groups ``stage1..stage4`` (ViT-B: 3 blocks each); ``norm`` and the maps follow their input."""
    per = max(1, -(-depth // stages))

    def fn(name: str):
        if name in ("patch_embed", "patch_tokens", "cls_token", "pos_embed"):
            return "stem"
        if name.startswith("block") and name[5:].isdigit():
            return f"stage{min(stages, int(name[5:]) // per + 1)}"
        return None
    return fn

