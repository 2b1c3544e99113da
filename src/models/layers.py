"""Small serialisable layers shared by architectures, and the preprocessing vocabulary."""
from __future__ import annotations

import keras
from keras import layers, ops

#: The one preprocessing vocabulary of the library: how a network scales its [0, 1] RGB
#: input for what its first layers expect (``keras.applications.<module>.preprocess_input``
#: applied to 0..255 pixels): ``none`` (identity: networks trained from scratch);
#: ``raw255`` (x*255: EfficientNet, ConvNeXt, MobileNetV3 normalise inside the network
#: and take raw pixels); ``caffe`` (RGB->BGR, x*255 minus the ImageNet mean: ResNet,
#: VGG); ``tf`` (x*2-1: ResNetV2, MobileNetV2); ``torch`` ((x - mean) / std: DenseNet).
#: The per-backbone choice is in :data:`src.models.backbones.SPECS`. The data pipeline
#: always yields [0, 1] images.
PREPROCESS_MODES = ("none", "raw255", "caffe", "tf", "torch")
_IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
_IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="btmtl")
class Preprocess(layers.Layer):
    """Input scaling inside the model, from [0, 1] RGB images (a mode of :data:`PREPROCESS_MODES`).

    Models of this library take [0, 1] images; the scaling a pretrained backbone expects
    happens here, so training, prediction and exported models agree by construction.
    """

    def __init__(self, mode: str = "none", **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"preprocessing must be one of {PREPROCESS_MODES}, got {mode!r}")
        self.mode = mode

    def call(self, x):
        if self.mode == "none":
            return x
        if self.mode == "raw255":
            # "+ 0": the two operations of Keras' Rescaling(255), which the backbone held before
            # raw255 existed; without it TensorFlow's graph optimiser folds x * 255 into the
            # application's own first Rescaling, and training differs in the last float digit
            return x * 255.0 + 0.0
        if self.mode == "tf":
            return x * 2.0 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_IMAGENET_MEAN_RGB, x.dtype)
            std = ops.convert_to_tensor(_IMAGENET_STD_RGB, x.dtype)
            return (x - mean) / std
        # caffe: BGR, 0..255, minus the ImageNet mean (in BGR order)
        bgr = ops.flip(x, axis=-1) * 255.0
        return bgr - ops.convert_to_tensor(_CAFFE_MEAN_BGR, x.dtype)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="btmtl")
class ResizeTo(layers.Layer):
    """Resize a feature map to a fixed ``(height, width)`` (bilinear by default)."""

    def __init__(self, size, interpolation: str = "bilinear", **kwargs):
        super().__init__(**kwargs)
        self.size = (int(size[0]), int(size[1]))
        self.interpolation = interpolation

    def call(self, x):
        if tuple(x.shape[1:3]) == self.size:
            return x
        return ops.cast(ops.image.resize(x, self.size, interpolation=self.interpolation), x.dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.size, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "size": list(self.size), "interpolation": self.interpolation}


def _gpu_visible() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_logical_devices("GPU"))


@keras.saving.register_keras_serializable(package="btmtl")
class GroupedConv2D(layers.Conv2D):
    """``Conv2D(groups=g)`` with the same weights, computed as ``g`` convolutions on a CPU.

    TensorFlow's CPU kernels for a grouped convolution are two orders of magnitude slower
    than ``g`` ordinary convolutions of the channel slices, concatenated (a ResNeXt 3 x 3
    convolution, 32 groups, 128 channels at 16 x 16, batch 32, forward and backward: 4.7 s
    against 20 ms on a 2-core Xeon). On a GPU the native grouped kernel (cuDNN) runs. The
    kernel keeps the shape ``(kh, kw, in / g, out)`` of ``Conv2D``, so weights, converted
    checkpoints and saved models are interchangeable with it; the outputs are identical.
    """

    def convolution_op(self, inputs, kernel):
        if self.groups == 1 or _gpu_visible():
            return super().convolution_op(inputs, kernel)
        axis = -1 if self.data_format == "channels_last" else 1
        parts = zip(ops.split(inputs, self.groups, axis=axis), ops.split(kernel, self.groups, axis=-1))
        return ops.concatenate([ops.conv(x, k, strides=self.strides, padding=self.padding,
                                         data_format=self.data_format, dilation_rate=self.dilation_rate)
                                for x, k in parts], axis=axis)
