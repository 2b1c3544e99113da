"""Swin Transformer (Liu et al. 2021) backbone, written in Keras, as a feature pyramid.

``swin_tiny`` (Swin-T: patch 4, width 96, depths 2-2-6-2, heads 3-6-12-24, window 7,
28 M parameters) with timm's layout (``swin_tiny_patch4_window7_224``), tokens kept as
``[B, H, W, C]`` maps throughout (as timm >= 0.9 does), so every stage is a spatial
feature map and the pyramid is the stages' outputs::

    patch_embed (Conv2D 4x4, stride 4) -> patch_embed_norm          stem,   stride 4
    stage1_block0, stage1_block1                                     P2 (96),  stride 4
    stage2_merge, stage2_block0, stage2_block1                       P3 (192), stride 8
    stage3_merge, stage3_block0 .. stage3_block5                     P4 (384), stride 16
    stage4_merge, stage4_block0, stage4_block1 -> norm               P5 (768), stride 32

A stage owns the patch-merging layer in front of it (``stageK_merge``: 2x2 neighbours
concatenated, LayerNorm, linear 4C -> 2C); the final LayerNormalization belongs to stage4.
Blocks alternate regular and shifted windows (shift = window // 2).

Input sizes: as timm does (``always_partition=False``), where a stage's grid is no larger
than the window, the window shrinks to the grid and the block does not shift; otherwise
the grid is zero-padded at the bottom / right to a multiple of the window (after the
cyclic shift) and cropped back. The relative-position bias table is always stored for
the configured window (``(2*7-1)**2`` rows), so one weights file fits every input size; a
smaller window reads the rows of its own offsets (timm instead interpolates the table when
it loads a checkpoint at another window: at inputs below 224 px the two differ there).
"""
from __future__ import annotations

import dataclasses
import re

import keras
import numpy as np
from keras import layers, ops

from .vit import TransformerBlock

LN_EPSILON = 1e-5  # torch.nn.LayerNorm's default, used by timm's Swin
STAGES = ("stem", "stage1", "stage2", "stage3", "stage4")


@dataclasses.dataclass(frozen=True)
class SwinConfig:
    patch: int = 4
    dim: int = 96
    depths: tuple = (2, 2, 6, 2)
    heads: tuple = (3, 6, 12, 24)
    window: int = 7
    mlp_ratio: float = 4.0


CONFIGS = {"swin_tiny": SwinConfig()}


def window_shift(grid, window: int, shifted: bool) -> tuple[tuple, tuple]:
    """``(window (h, w), shift (h, w))`` of a block on a ``grid`` of tokens (timm's rule)."""
    win, shift = [], []
    for g in grid:
        if g <= window:
            win.append(int(g))
            shift.append(0)
        else:
            win.append(int(window))
            shift.append(window // 2 if shifted else 0)
    return tuple(win), tuple(shift)


def relative_index(win, window: int) -> np.ndarray:
    """``[N, N]`` rows of a ``(2*window-1)**2`` bias table for a ``win`` window (N = wh * ww)."""
    coords = np.stack(np.meshgrid(np.arange(win[0]), np.arange(win[1]), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return (rel[0] * (2 * window - 1) + rel[1]).astype(np.int32)


def shift_mask(padded, win, shift) -> np.ndarray | None:
    """``[nW, N, N]`` additive mask (-100 between tokens from different regions of the
    shifted, padded grid), or None without a shift (timm's ``get_attn_mask``)."""
    if not any(shift):
        return None
    img = np.zeros(padded, np.int32)
    cnt = 0
    hs = ((0, -win[0]), (-win[0], -shift[0] or None), (-shift[0] or None, None)) if shift[0] else ((0, None),)
    ws = ((0, -win[1]), (-win[1], -shift[1] or None), (-shift[1] or None, None)) if shift[1] else ((0, None),)
    for h in hs:
        for w in ws:
            img[h[0]:h[1], w[0]:w[1]] = cnt
            cnt += 1
    ids = img.reshape(padded[0] // win[0], win[0], padded[1] // win[1], win[1]).transpose(0, 2, 1, 3)
    ids = ids.reshape(-1, win[0] * win[1])
    return np.where(ids[:, :, None] != ids[:, None, :], -100.0, 0.0).astype(np.float32)


@keras.saving.register_keras_serializable(package="btmtl")
class SwinBlock(TransformerBlock):
    """A Swin block on ``[B, H, W, C]`` maps: (shifted) window self-attention with a
    relative-position bias, then the MLP, each pre-normed in a residual branch."""

    def __init__(self, dim: int, heads: int, window: int = 7, shifted: bool = False, mlp_ratio: float = 4.0,
                 epsilon: float = LN_EPSILON, **kwargs):
        super().__init__(dim, heads, mlp_ratio=mlp_ratio, epsilon=epsilon, **kwargs)
        self.window, self.shifted = int(window), bool(shifted)

    def build(self, input_shape):
        if len(input_shape) != 4 or None in tuple(input_shape[1:3]):
            raise ValueError(f"{self.name}: needs [B, H, W, C] with a fixed H, W; got {input_shape}")
        super().build(input_shape)
        self.relative_position_bias_table = self.add_weight(
            shape=((2 * self.window - 1) ** 2, self.heads), name="relative_position_bias_table",
            initializer=keras.initializers.TruncatedNormal(stddev=0.02))

    def mix(self, x):
        hgt, wid = int(x.shape[1]), int(x.shape[2])
        win, shift = window_shift((hgt, wid), self.window, self.shifted)
        x = self.norm1(x)
        if any(shift):
            x = ops.roll(x, shift=(-shift[0], -shift[1]), axis=(1, 2))
        ph, pw = -hgt % win[0], -wid % win[1]
        if ph or pw:
            x = ops.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
        hp, wp = hgt + ph, wid + pw
        nh, nw, n = hp // win[0], wp // win[1], win[0] * win[1]
        windows = ops.reshape(ops.transpose(ops.reshape(x, (-1, nh, win[0], nw, win[1], self.dim)),
                                            (0, 1, 3, 2, 4, 5)), (-1, n, self.dim))
        idx = relative_index(win, self.window).reshape(-1)
        bias = ops.take(self.relative_position_bias_table, idx, axis=0)        # [N*N, heads]
        bias = ops.transpose(ops.reshape(bias, (n, n, self.heads)), (2, 0, 1))  # [heads, N, N]
        mask = shift_mask((hp, wp), win, shift)
        out = self.attention(windows, bias=bias, mask=None if mask is None else ops.convert_to_tensor(mask))
        out = ops.reshape(ops.transpose(ops.reshape(out, (-1, nh, nw, win[0], win[1], self.dim)),
                                        (0, 1, 3, 2, 4, 5)), (-1, hp, wp, self.dim))
        out = out[:, :hgt, :wid]
        if any(shift):
            out = ops.roll(out, shift=shift, axis=(1, 2))
        return out

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "window": self.window, "shifted": self.shifted}


@keras.saving.register_keras_serializable(package="btmtl")
class PatchMerging(layers.Layer):
    """``[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]``: each 2x2 neighbourhood
    concatenated (timm's order), LayerNorm, a linear map 4C -> 2C without bias."""

    def __init__(self, dim: int, epsilon: float = LN_EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.epsilon = int(dim), float(epsilon)
        self.norm = layers.LayerNormalization(epsilon=self.epsilon, name="norm", dtype=self.dtype_policy)
        self.reduction = layers.Dense(2 * self.dim, use_bias=False, name="reduction", dtype=self.dtype_policy)

    def build(self, input_shape):
        shape = (*tuple(input_shape)[:-1], 4 * self.dim)
        self.norm.build(shape)
        self.reduction.build(shape)
        self.built = True

    def call(self, x):
        hgt, wid = int(x.shape[1]), int(x.shape[2])
        ph, pw = hgt % 2, wid % 2
        if ph or pw:
            x = ops.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
        h2, w2 = (hgt + ph) // 2, (wid + pw) // 2
        x = ops.reshape(x, (-1, h2, 2, w2, 2, self.dim))
        x = ops.reshape(ops.transpose(x, (0, 1, 3, 4, 2, 5)), (-1, h2, w2, 4 * self.dim))
        return self.reduction(self.norm(x))

    def compute_output_shape(self, input_shape):
        h, w = input_shape[1], input_shape[2]
        return (input_shape[0], None if h is None else -(-h // 2), None if w is None else -(-w // 2), 2 * self.dim)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "epsilon": self.epsilon}


def swin(inputs, arch: str) -> keras.Model:
    """The Swin ``arch`` (a key of :data:`CONFIGS`) on ``inputs``; output: the normed last stage."""
    c = CONFIGS[arch]
    x = layers.Conv2D(c.dim, c.patch, strides=c.patch, padding="valid", name="patch_embed")(inputs)
    x = layers.LayerNormalization(epsilon=LN_EPSILON, name="patch_embed_norm")(x)
    dim = c.dim
    for s, (depth, heads) in enumerate(zip(c.depths, c.heads), start=1):
        if s > 1:
            x = PatchMerging(dim, name=f"stage{s}_merge")(x)
            dim *= 2
        for b in range(depth):
            x = SwinBlock(dim, heads, c.window, shifted=bool(b % 2), mlp_ratio=c.mlp_ratio,
                          name=f"stage{s}_block{b}")(x)
    x = layers.LayerNormalization(epsilon=LN_EPSILON, name="norm")(x)
    return keras.Model(inputs, x, name=arch)


def swin_tiny(inputs) -> keras.Model:
    return swin(inputs, "swin_tiny")


def stage_rule(name: str):
    """Layer name -> stage: ``patch_embed*`` is ``stem``, ``stageK_*`` is ``stageK``; the
    final ``norm`` follows its input (stage4)."""
    if name.startswith("patch_embed"):
        return "stem"
    m = re.match(r"(stage[1-4])_", name)
    return m.group(1) if m else None
