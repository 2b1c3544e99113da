"""EfficientMTNet: a lightweight joint tumour segmenter + classifier with a real Hamburger head.

The published EfficientMTNet (a PyTorch repository with two READMEs: "~4M params / 45 FPS"
and "1.38M params") made correct and configurable::

    image [0, 1] -> x*2-1
    learning-to-downsample (/8):  conv3x3 s2 (32) -> DSConv+SE s2 (48) -> DSConv+SE s2 (64)   = low
    global feature extractor:     inverted residual + SE (expansion 6) stages
                                  64 ch /16 (f1), 96 ch /32 (f2), 128 ch /32 (f3)
    multi-scale neck:             1x1 laterals of f1, f2, f3 -> resize to /8 -> concat
                                  -> DSConv+SE -> global-context block            = high
    gated fusion:                 g = sigmoid(1x1(GAP([low', high'])));  g*low' + (1-g)*high'
                                  -> DSConv+SE
    heads:  mask       DSConv+SE x2 [-> detail steps] -> dropout -> 1x1 -> resize to the input -> sigmoid
            class      global-context on f3 -> GAP [+ mask-guided pooling] -> 64 -> dropout -> classes -> softmax
            mask_aux1  on f1, mask_aux2 on f2 (deep supervision, training only): conv3x3 ->
                       dropout -> 1x1 -> resize -> sigmoid

Detail steps (``detail_strides``, off in the published model): the mask head above decides
at /8 (32 x 32 logits for a 256 px slice), so a tumour's edge is a bilinear guess between
cells 8 px apart. Each listed stride (4, then 2) upsamples the decoder features to that
stride, concatenates a 1x1 projection of the learning-to-downsample features there
(48 ch at /4, 32 ch at /2) and mixes them with a DSConv+SE of ``detail_channels``: a
DeepLabv3+-style refinement. Few parameters, but full-resolution work: the /4 step trained
at 22.9 img/s against 28.0 at 256 px on the 2-core CPU (README, ablations).

Mask-guided class pooling (``mask_guided_class``, off in the published model): the class
head also gets the fused /8 features averaged *inside the predicted tumour*
(:class:`MaskWeightedPool`, weights = the mask head's probability, no gradient into it),
so the type is read from the lesion rather than from the whole slice, where a subtype's
usual place (the sella for a pituitary tumour) can stand in for its look.

The global-context block (``context``):

* ``ham`` (default): the Hamburger of Geng et al. 2021 ("Is Attention Better Than Matrix
  Decomposition?", the LightHam of SegNeXt): 1x1 conv in + ReLU (non-negative features),
  NMF of the ``[C, N]`` feature matrix (N = H*W positions) with multiplicative updates
  (:class:`NMF2D`, one-step gradient), 1x1 conv out + BN, residual add and ReLU. Its cost
  is linear in N: ``O(N*C*R)`` per step for rank R.
* ``attention``: what the published code ran under the name "LightHam": full
  (non-local) self-attention over all N positions with 32-channel queries/keys/values
  and a zero-initialised residual scale. Its cost is quadratic in N (a 6400 x 6400
  attention map per image at 640 px). Kept for comparison.
* ``none``: identity.

Every layer of a head is named ``<head>`` or ``<head>_*`` (so
:meth:`MultiTaskModel.freeze_inactive_heads` finds them); the backbone and neck layers are
``ltd_*``, ``gfe_*``, ``neck_*`` and ``fusion_*``. Head outputs are float32 under mixed
precision and the NMF runs in float32 inside its layer.
"""
from __future__ import annotations

from typing import Optional, Sequence

import keras
from keras import layers, ops

from .layers import Preprocess, ResizeTo
from .registry import register_model

CONTEXTS = ("ham", "attention", "none")
AUX_HEADS = ("mask_aux1", "mask_aux2")
HEADS = ("class", "mask", *AUX_HEADS)


# ---------------------------------------------------------------------------------------
# NMF (Hamburger): pure functions, used by the layer and by the tests
# ---------------------------------------------------------------------------------------
def nmf_init_coef(x, bases):
    """Initial coefficients ``softmax(X^T D)`` (``[B, N, R]``) as in the authors' NMF2D.

    ``x``: ``[B, N, C]`` non-negative features (the transposed ``[C, N]`` matrix of each
    image); ``bases``: ``[B or 1, C, R]`` non-negative bases.
    """
    return ops.softmax(ops.matmul(x, bases), axis=-1)


def nmf_update(x, bases, coef, eps: float = 1e-6):
    """One multiplicative update (Lee & Seung 2001) of ``X ~= D C`` for the Frobenius loss.

    With ``X = x^T`` (``[C, N]``), ``D = bases`` (``[C, R]``), ``C = coef^T`` (``[R, N]``)::

        C <- C * (D^T X) / (D^T D C + eps)
        D <- D * (X C^T) / (D C C^T + eps)

    Both factors stay non-negative and ``||X - D C||`` does not increase (up to ``eps``).
    Returns ``(bases, coef)``.
    """
    num = ops.matmul(x, bases)                                              # [B, N, R]
    den = ops.matmul(coef, ops.matmul(ops.transpose(bases, (0, 2, 1)), bases))
    coef = coef * num / (den + eps)
    num = ops.matmul(ops.transpose(x, (0, 2, 1)), coef)                    # [B, C, R]
    den = ops.matmul(bases, ops.matmul(ops.transpose(coef, (0, 2, 1)), coef))
    bases = bases * num / (den + eps)
    return bases, coef


def nmf(x, bases, steps: int, eps: float = 1e-6, one_step_gradient: bool = True):
    """``steps`` multiplicative updates of ``x^T ~= bases @ coef^T``; returns ``(bases, coef)``.

    ``one_step_gradient`` (Geng et al. 2021, Sec. 2.3): the first ``steps - 1`` updates run
    under ``stop_gradient`` and only the last one is differentiated, so backpropagation
    costs one step whatever ``steps`` is and does not suffer the exploding/vanishing
    gradients of unrolled optimisation.
    """
    if steps < 1:
        raise ValueError(f"NMF needs steps >= 1, got {steps}")
    x_fixed = ops.stop_gradient(x) if one_step_gradient else x
    coef = nmf_init_coef(x_fixed, bases)
    for _ in range(steps - 1):
        bases, coef = nmf_update(x_fixed, bases, coef, eps)
    if one_step_gradient:
        bases, coef = ops.stop_gradient(bases), ops.stop_gradient(coef)
    return nmf_update(x, bases, coef, eps)


def nmf_reconstruction(bases, coef):
    """``(D C)^T``: ``[B, N, C]`` from bases ``[B, C, R]`` and coefficients ``[B, N, R]``."""
    return ops.matmul(coef, ops.transpose(bases, (0, 2, 1)))


@keras.saving.register_keras_serializable(package="btmtl")
class NMF2D(layers.Layer):
    """Low-rank NMF reconstruction of a non-negative feature map (the Hamburger "ham").

    The ``[H, W, C]`` map of each image is read as the ``[C, N]`` matrix ``X`` (N = H*W)
    and replaced by ``D C``, its rank-``rank`` NMF after ``steps`` multiplicative updates
    (``eval_steps`` at inference; the authors use 6 / 7). The initial bases are a fixed,
    non-trainable ``[C, rank]`` uniform draw (seeded; L2-normalised over C), saved with the
    model, so predictions are deterministic and identical after save -> load. The
    coefficients start at ``softmax(X^T D)``. One-step gradient: see :func:`nmf`.

    The decomposition runs in float32 whatever the dtype policy (multiplicative updates
    divide by small numbers) and is cast back to the compute dtype.
    """

    def __init__(self, rank: int = 16, steps: int = 6, eval_steps: Optional[int] = 7, eps: float = 1e-6,
                 seed: int = 0, one_step_gradient: bool = True, **kwargs):
        super().__init__(**kwargs)
        if int(rank) < 1 or int(steps) < 1 or (eval_steps is not None and int(eval_steps) < 1):
            raise ValueError(f"NMF2D needs rank, steps and eval_steps >= 1, got {rank}, {steps}, {eval_steps}")
        self.rank = int(rank)
        self.steps = int(steps)
        self.eval_steps = int(eval_steps) if eval_steps is not None else int(steps)
        self.eps = float(eps)
        self.seed = int(seed)
        self.one_step_gradient = bool(one_step_gradient)

    def build(self, input_shape):
        channels = int(input_shape[-1])
        self.bases_init = self.add_weight(
            name="bases_init", shape=(channels, self.rank), trainable=False, autocast=False,
            initializer=keras.initializers.RandomUniform(0.0, 1.0, seed=self.seed))

    def call(self, x, training=None):
        h, w, c = x.shape[1], x.shape[2], x.shape[3]
        dtype = x.dtype
        flat = ops.relu(ops.reshape(ops.cast(x, "float32"), (-1, h * w, c)))
        bases = ops.cast(self.bases_init, "float32")
        bases = bases / ops.sqrt(ops.sum(ops.square(bases), axis=0, keepdims=True) + 1e-12)
        bases = ops.expand_dims(bases, 0)                                     # [1, C, R]: broadcasts over B
        steps = self.steps if training else self.eval_steps
        bases, coef = nmf(flat, bases, steps, self.eps, self.one_step_gradient)
        out = nmf_reconstruction(bases, coef)
        return ops.cast(ops.reshape(out, (-1, h, w, c)), dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rank": self.rank, "steps": self.steps, "eval_steps": self.eval_steps,
                "eps": self.eps, "seed": self.seed, "one_step_gradient": self.one_step_gradient}


# ---------------------------------------------------------------------------------------
# other small layers
# ---------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="btmtl")
class SpatialSelfAttention(layers.Layer):
    """Full dot-product attention over all H*W positions of ``[q, k, v]`` maps.

    ``softmax(Q K^T / sqrt(d)) V`` with ``Q, K`` ``[B, N, d]`` and ``V`` ``[B, N, c]``: an
    ``N x N`` map per image (quadratic in the number of positions). Plain ``matmul``s, so
    graph FLOP counters see them. The softmax runs in float32.
    """

    def call(self, inputs):
        q, k, v = inputs
        h, w, d, c = q.shape[1], q.shape[2], q.shape[3], v.shape[3]
        dtype = q.dtype
        q = ops.reshape(q, (-1, h * w, d))
        k = ops.reshape(k, (-1, h * w, d))
        v = ops.reshape(v, (-1, h * w, c))
        logits = ops.matmul(q, ops.transpose(k, (0, 2, 1))) * ops.cast(1.0 / float(d) ** 0.5, dtype)
        attn = ops.cast(ops.softmax(ops.cast(logits, "float32"), axis=-1), dtype)
        return ops.reshape(ops.matmul(attn, v), (-1, h, w, c))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[2])


@keras.saving.register_keras_serializable(package="btmtl")
class ScaledResidual(layers.Layer):
    """``x + gamma * y`` with a learned scalar ``gamma`` (initially ``init``; 0 as published)."""

    def __init__(self, init: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.init = float(init)

    def build(self, input_shape):
        self.gamma = self.add_weight(name="gamma", shape=(), initializer=keras.initializers.Constant(self.init))

    def call(self, inputs):
        x, y = inputs
        return x + ops.cast(self.gamma, y.dtype) * y

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        return {**super().get_config(), "init": self.init}


@keras.saving.register_keras_serializable(package="btmtl")
class MaskWeightedPool(layers.Layer):
    """Average of features ``[B, h, w, C]`` weighted by a probability map ``[B, h, w, 1]``:
    ``(sum(m f) + prior * mean(f)) / (sum(m) + prior)``. The ``prior`` (in pixels of the map)
    makes an empty map give the plain average and a one-pixel map half of each, smoothly.
    The map gets no gradient (the class loss does not redraw the mask)."""

    def __init__(self, prior: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not prior > 0:
            raise ValueError(f"prior must be > 0, got {prior}")
        self.prior = float(prior)

    def call(self, inputs):
        f, m = inputs
        dtype = f.dtype
        f = ops.cast(f, "float32")   # sums over every position: float32 even under float16
        m = ops.stop_gradient(ops.cast(m, "float32"))
        num = ops.sum(f * m, axis=(1, 2)) + self.prior * ops.mean(f, axis=(1, 2))
        return ops.cast(num / (ops.sum(m, axis=(1, 2)) + self.prior), dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], input_shape[0][-1])

    def get_config(self):
        return {**super().get_config(), "prior": self.prior}


@keras.saving.register_keras_serializable(package="btmtl")
class GatedSum(layers.Layer):
    """``g * a + (1 - g) * b`` for inputs ``[a, b, g]`` (``g`` in [0, 1], broadcast)."""

    def call(self, inputs):
        a, b, g = inputs
        return g * a + (1.0 - g) * b

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])


# ---------------------------------------------------------------------------------------
# blocks (functional)
# ---------------------------------------------------------------------------------------
def _bn(x, name, momentum):
    return layers.BatchNormalization(momentum=momentum, name=name)(x)


def conv_bn(x, filters, kernel, stride, name, momentum, act: Optional[str] = "relu"):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = _bn(x, f"{name}_bn", momentum)
    return layers.Activation(act, name=f"{name}_{act}")(x) if act else x


def se_block(x, ratio: int, name: str):
    """Squeeze-and-excitation: GAP -> C/ratio (ReLU) -> C (sigmoid) -> channel scale."""
    c = int(x.shape[-1])
    s = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pool")(x)
    s = layers.Conv2D(max(4, c // ratio), 1, activation="relu", use_bias=False, name=f"{name}_reduce")(s)
    s = layers.Conv2D(c, 1, activation="sigmoid", use_bias=False, name=f"{name}_expand")(s)
    return layers.Multiply(name=f"{name}_scale")([x, s])


def dsconv_se(x, filters, stride, name, momentum, se_ratio):
    """Depthwise-separable conv (dw3x3-BN-ReLU, 1x1-BN-ReLU) + SE."""
    x = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"{name}_dw")(x)
    x = _bn(x, f"{name}_dw_bn", momentum)
    x = layers.Activation("relu", name=f"{name}_dw_relu")(x)
    x = conv_bn(x, filters, 1, 1, f"{name}_pw", momentum)
    return se_block(x, se_ratio, f"{name}_se")


def inverted_residual_se(x, filters, stride, expansion, name, momentum, se_ratio):
    """MobileNetV2 block (1x1 expand-ReLU6, dw3x3-ReLU6, 1x1 project) + SE on the output."""
    cin = int(x.shape[-1])
    y = x
    if expansion != 1:
        y = conv_bn(y, cin * expansion, 1, 1, f"{name}_expand", momentum, act="relu6")
    y = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"{name}_dw")(y)
    y = _bn(y, f"{name}_dw_bn", momentum)
    y = layers.Activation("relu6", name=f"{name}_dw_relu6")(y)
    y = conv_bn(y, filters, 1, 1, f"{name}_project", momentum, act=None)
    y = se_block(y, se_ratio, f"{name}_se")
    if stride == 1 and cin == filters:
        y = layers.Add(name=f"{name}_add")([x, y])
    return y


def context_block(x, kind: str, name: str, momentum: float = 0.9, ham_channels: int = 64, ham_rank: int = 16,
                  ham_steps: int = 6, ham_eval_steps: int = 7, ham_seed: int = 0, attention_channels: int = 32):
    """Global context on a feature map: ``ham`` | ``attention`` | ``none`` (see the module doc)."""
    if kind not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {kind!r}")
    if kind == "none":
        return x
    c = int(x.shape[-1])
    if kind == "ham":
        h = layers.Conv2D(ham_channels, 1, name=f"{name}_ham_in")(x)
        h = layers.Activation("relu", name=f"{name}_ham_in_relu")(h)
        h = NMF2D(rank=ham_rank, steps=ham_steps, eval_steps=ham_eval_steps, seed=ham_seed, name=f"{name}_nmf")(h)
        h = layers.Conv2D(c, 1, use_bias=False, name=f"{name}_ham_out")(h)
        h = _bn(h, f"{name}_ham_out_bn", momentum)
        y = layers.Add(name=f"{name}_add")([x, h])
        return layers.Activation("relu", name=f"{name}_relu")(y)
    q = layers.Conv2D(attention_channels, 1, use_bias=False, name=f"{name}_query")(x)
    k = layers.Conv2D(attention_channels, 1, use_bias=False, name=f"{name}_key")(x)
    v = layers.Conv2D(attention_channels, 1, use_bias=False, name=f"{name}_value")(x)
    a = SpatialSelfAttention(name=f"{name}_attention")([q, k, v])
    a = layers.Conv2D(c, 1, use_bias=False, name=f"{name}_out")(a)
    a = _bn(a, f"{name}_out_bn", momentum)
    return ScaledResidual(0.0, name=f"{name}_residual")([x, a])


def _mask_output(logits, size, name):
    logits = ResizeTo(size, name=f"{name}_resize")(logits)
    return layers.Activation("sigmoid", dtype="float32", name=name)(logits)


def resolve_heads(heads: Sequence[str], aux: bool) -> list:
    """Requested heads + the auxiliary mask heads when ``aux`` (and a mask head) is on."""
    heads = [str(h) for h in (heads or ())]
    unknown = sorted(set(heads) - set(HEADS))
    if unknown:
        raise ValueError(f"efficient_mtnet: unknown heads {unknown}; available: {list(HEADS)}")
    if aux and "mask" in heads:
        heads += [h for h in AUX_HEADS if h not in heads]
    elif not aux:
        heads = [h for h in heads if h not in AUX_HEADS]
    if not heads:
        raise ValueError("efficient_mtnet needs at least one head")
    return [h for h in HEADS if h in heads]


# ---------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------
@register_model("efficient_mtnet")
# long on purpose: the network reads top to bottom like the diagram in the module docstring
# (encoder, neck, fusion, heads); its blocks are the functions above
def efficient_mtnet(num_classes: int = 4, image_size=640, heads=("class", "mask"), context: str = "ham",
                    aux: bool = True, class_context: Optional[str] = None,
                    ltd_channels=(32, 48, 64), widths=(64, 96, 128), strides=(2, 2, 1), blocks=(3, 3, 3),
                    expansion: int = 6, se_ratio: int = 4, neck_channels: int = 128, decoder_channels=(128, 64),
                    ham_channels: int = 64, ham_rank: int = 16, ham_steps: int = 6, ham_eval_steps: int = 7,
                    ham_seed: int = 0, attention_channels: int = 32, class_hidden: int = 64,
                    dropout: float = 0.1, seg_dropout: float = 0.1, bn_momentum: float = 0.9,
                    detail_strides=(), detail_channels: int = 48, mask_guided_class: bool = False,
                    input_scaling: str = "tf") -> keras.Model:
    """Build EfficientMTNet (see the module docstring).

    Args:
        num_classes: classes of the ``class`` head.
        image_size: int or ``[height, width]`` (published: 640; any size works, the
            masks are resized back to it).
        heads: any of ``class``, ``mask`` (+ ``mask_aux1``, ``mask_aux2``).
        context: neck global-context block, ``ham`` | ``attention`` | ``none``.
        aux: add the deep-supervision heads ``mask_aux1`` (on stage 1, /16) and
            ``mask_aux2`` (on stage 2, /32) when a mask head is built.
        class_context: global context of the class head on the deepest features
            (default: same as ``context``).
        ltd_channels / widths / strides / blocks / expansion / se_ratio: encoder shape.
        neck_channels, decoder_channels: neck width and the two segmentation DSConv widths.
        ham_channels, ham_rank, ham_steps, ham_eval_steps, ham_seed: Hamburger settings.
        attention_channels: query/key/value width of ``attention``.
        class_hidden, dropout: class head (GAP -> class_hidden -> dropout -> classes).
        seg_dropout: dropout before the 1x1 classifiers of the mask heads.
        detail_strides: strides (from 4 and 2, coarsest first) at which the mask decoder is
            refined with the learning-to-downsample features (empty: published, /8 logits).
        detail_channels: width of each detail step.
        mask_guided_class: the class head also pools the fused /8 features inside the
            predicted mask (:class:`MaskWeightedPool`; needs the mask head).
        input_scaling: in-model scaling of the [0, 1] input, a mode of
            :data:`src.models.layers.PREPROCESS_MODES` (``tf``: x*2-1).
    """
    size = (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    heads = resolve_heads(heads, aux)
    class_context = context if class_context is None else class_context
    for kind in (context, class_context):
        if kind not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {kind!r}")
    if not (len(widths) == len(strides) == len(blocks) == 3):
        raise ValueError("widths, strides and blocks need three entries (stages 1, 2, 3)")
    detail_strides = sorted({int(v) for v in (detail_strides or ())}, reverse=True)
    if set(detail_strides) - {4, 2}:
        raise ValueError(f"detail_strides takes 4 and/or 2 (the learning-to-downsample strides), got {detail_strides}")
    m = float(bn_momentum)
    ctx_kw = dict(momentum=m, ham_channels=int(ham_channels), ham_rank=int(ham_rank), ham_steps=int(ham_steps),
                  ham_eval_steps=int(ham_eval_steps), ham_seed=int(ham_seed),
                  attention_channels=int(attention_channels))

    inputs = keras.Input((*size, 3), name="image")
    x = Preprocess(input_scaling, name="preprocess")(inputs)

    # learning to downsample (/8)
    c0, c1, c2 = (int(c) for c in ltd_channels)
    x2 = conv_bn(x, c0, 3, 2, "ltd_stem", m)
    x4 = dsconv_se(x2, c1, 2, "ltd_ds1", m, se_ratio)
    low = dsconv_se(x4, c2, 2, "ltd_ds2", m, se_ratio)

    # global feature extractor
    feats = []
    x = low
    for s, (w, st, n) in enumerate(zip(widths, strides, blocks), start=1):
        for b in range(int(n)):
            x = inverted_residual_se(x, int(w), int(st) if b == 0 else 1, int(expansion), f"gfe_s{s}_b{b + 1}", m,
                                     se_ratio)
        feats.append(x)
    f1, f2, f3 = feats

    outputs = {}
    if "mask" in heads:
        # multi-scale neck: 1x1 laterals -> /8 -> concat -> DSConv+SE -> global context
        size8 = tuple(int(v) for v in low.shape[1:3])
        lats = []
        for i, f in enumerate(feats, start=1):
            lat = conv_bn(f, int(neck_channels), 1, 1, f"neck_lateral{i}", m)
            lats.append(ResizeTo(size8, name=f"neck_lateral{i}_resize")(lat))
        y = layers.Concatenate(name="neck_concat")(lats)
        y = dsconv_se(y, int(neck_channels), 1, "neck_fuse", m, se_ratio)
        high = context_block(y, context, "neck_context", **ctx_kw)

        # gated fusion of low-level (/8 detail) and high-level (context) features
        lo = conv_bn(low, int(neck_channels), 1, 1, "fusion_low", m)
        hi = conv_bn(high, int(neck_channels), 1, 1, "fusion_high", m)
        g = layers.Concatenate(name="fusion_concat")([lo, hi])
        g = layers.GlobalAveragePooling2D(keepdims=True, name="fusion_pool")(g)
        g = layers.Conv2D(int(neck_channels), 1, activation="sigmoid", use_bias=False, name="fusion_gate")(g)
        fused = GatedSum(name="fusion_sum")([lo, hi, g])
        fused = dsconv_se(fused, int(neck_channels), 1, "fusion_out", m, se_ratio)

        # segmentation head
        y = fused
        for i, w in enumerate(decoder_channels, start=1):
            y = dsconv_se(y, int(w), 1, f"mask_dec{i}", m, se_ratio)
        for stride in detail_strides:  # DeepLabv3+-style refinement with the early, sharp features
            skip = {4: x4, 2: x2}[stride]
            y = ResizeTo(tuple(int(v) for v in skip.shape[1:3]), name=f"mask_detail{stride}_resize")(y)
            s_ = conv_bn(skip, 32, 1, 1, f"mask_detail{stride}_skip", m)
            y = layers.Concatenate(name=f"mask_detail{stride}_concat")([y, s_])
            y = dsconv_se(y, int(detail_channels), 1, f"mask_detail{stride}", m, se_ratio)
        if seg_dropout:
            y = layers.Dropout(seg_dropout, name="mask_dropout")(y)
        y = layers.Conv2D(1, 1, name="mask_logits")(y)
        outputs["mask"] = _mask_output(y, size, "mask")
        mask8 = y if tuple(y.shape[1:3]) == size8 else ResizeTo(size8, name="class_mask_resize")(y)

    if "class" in heads:
        y = context_block(f3, class_context, "class_context", **ctx_kw)
        y = layers.GlobalAveragePooling2D(name="class_pool")(y)
        if mask_guided_class:
            if "mask" not in heads:
                raise ValueError("mask_guided_class needs the mask head (heads: [class, mask])")
            prob = layers.Activation("sigmoid", name="class_mask_prob")(mask8)
            inside = MaskWeightedPool(name="class_mask_pool")([fused, prob])
            y = layers.Concatenate(name="class_pool_concat")([y, inside])
        y = layers.Dense(int(class_hidden), activation="relu", name="class_hidden")(y)
        if dropout:
            y = layers.Dropout(dropout, name="class_dropout")(y)
        y = layers.Dense(int(num_classes), name="class_logits")(y)
        outputs["class"] = layers.Activation("softmax", dtype="float32", name="class")(y)

    for head, f in zip(AUX_HEADS, (f1, f2)):
        if head not in heads:
            continue
        y = conv_bn(f, max(8, int(f.shape[-1]) // 2), 3, 1, f"{head}_conv", m)
        if seg_dropout:
            y = layers.Dropout(seg_dropout, name=f"{head}_dropout")(y)
        y = layers.Conv2D(1, 1, name=f"{head}_logits")(y)
        outputs[head] = _mask_output(y, size, head)

    outputs = {h: outputs[h] for h in HEADS if h in outputs}
    return keras.Model(inputs, outputs, name="efficient_mtnet")
