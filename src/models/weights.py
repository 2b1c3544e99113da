"""ImageNet weights files of the backbones (:mod:`src.models.backbones`): where each lives
and how obtaining one fails.

:class:`WeightsFile` is the exact (file name, URL, hash) ``keras.applications`` requests
for ``weights='imagenet'``, built by the ``_*_file`` helpers from constants read out of the
Keras modules at call time; the networks written here have no Keras file, only a converted
one (:func:`own_weights_file`). :class:`WeightsUnavailableError` (the file cannot be
obtained; its message, ``_unavailable_message``, names ``model.weights=null`` and
``model.weights=/path/to/<file>``) and :class:`WeightsMismatchError` (a file does not fit);
``_keras_home`` (the default cache folder) and ``_probe`` (a short HEAD request, so an
offline machine fails in seconds). Downloading and loading by backbone name:
:func:`src.models.backbones.fetch_imagenet_weights` and
:func:`~src.models.backbones.load_weights_file`.
"""
from __future__ import annotations

import dataclasses
import os
import urllib.error
import urllib.request

DEFAULT_DOWNLOAD_TIMEOUT = 15.0


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights could not be obtained (no network, server error, bad download)."""


class WeightsMismatchError(ValueError):
    """A weights file does not fit the backbone it is loaded into."""


@dataclasses.dataclass(frozen=True)
class WeightsFile:
    """Where Keras keeps an application's ImageNet weights (``include_top=False``)."""

    fname: str
    origin: str
    file_hash: str | None


# ---------------------------------------------------------------------------------------
# ImageNet weight files: the exact (file name, URL, hash) keras.applications requests.
# Constants are read from the Keras modules at call time so they stay in step with Keras
# (and so a test can point them at a local server).
# ---------------------------------------------------------------------------------------
def _kmod(name: str):
    import importlib

    return importlib.import_module(f"keras.src.applications.{name}")


def _resnet_file(weights_name: str):
    def fn(input_shape):
        mod = _kmod("resnet")
        fname = f"{weights_name}_weights_tf_dim_ordering_tf_kernels_notop.h5"
        return WeightsFile(fname, mod.BASE_WEIGHTS_PATH + fname, mod.WEIGHTS_HASHES[weights_name][1])
    return fn


def _mobilenet_v2_file(input_shape):
    mod = _kmod("mobilenet_v2")
    rows, cols = input_shape[0], input_shape[1]
    if rows != cols or rows not in (96, 128, 160, 192, 224):
        rows = 224  # keras falls back to the 224 weights (with a warning)
    fname = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(1.0)}_{rows}_no_top.h5"
    return WeightsFile(fname, mod.BASE_WEIGHT_PATH + fname, None)


def _mobilenet_v3_file(kind: str):
    def fn(input_shape):
        mod = _kmod("mobilenet_v3")
        model_name = f"{kind}_224_{str(1.0)}_float"
        fname = f"weights_mobilenet_v3_{model_name}_no_top_v2.h5"
        return WeightsFile(fname, mod.BASE_WEIGHT_PATH + fname, mod.WEIGHTS_HASHES[model_name][1])
    return fn


def _efficientnet_file(variant: str):
    def fn(input_shape):
        mod = _kmod("efficientnet")
        fname = f"efficientnet{variant}_notop.h5"
        return WeightsFile(fname, mod.BASE_WEIGHTS_PATH + fname, mod.WEIGHTS_HASHES[variant][1])
    return fn


_VGG16_NOTOP_HASH = "6d6bbae143d832006294945121d1f1fc"  # literal in keras/src/applications/vgg16.py


def _vgg16_file(input_shape):
    mod = _kmod("vgg16")
    return WeightsFile("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", mod.WEIGHTS_PATH_NO_TOP,
                       _VGG16_NOTOP_HASH)


def _convnext_file(variant: str):
    def fn(input_shape):
        mod = _kmod("convnext")
        fname = f"convnext_{variant}_notop.h5"
        return WeightsFile(fname, mod.BASE_WEIGHTS_PATH + fname, mod.WEIGHTS_HASHES[f"convnext_{variant}"][1])
    return fn


# ---------------------------------------------------------------------------------------
# The networks written here: no Keras file is published, a converted one stands in.
# ---------------------------------------------------------------------------------------
def own_weights_file(name: str) -> WeightsFile:
    """No Keras ImageNet file is published for the networks written here: ``imagenet`` means
    a converted file (:mod:`src.models.convert`) under this name in ``~/.keras/models``."""
    return WeightsFile(f"{name}_imagenet_notop.weights.h5", "", None)


def _own_file(name: str):
    return lambda input_shape: own_weights_file(name)


# ---------------------------------------------------------------------------------------
# Obtaining a file: the Keras cache folder, the message when it cannot be had, the probe.
# ---------------------------------------------------------------------------------------
def _keras_home() -> str:
    try:
        from keras.src.backend import config as kconfig

        return kconfig.keras_home()
    except Exception:  # pragma: no cover - keras internals moved
        return os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))


def _unavailable_message(name: str, wf: WeightsFile, reason: str, cache_dir: str) -> str:
    cached = os.path.join(os.path.expanduser(cache_dir), "models", wf.fname)
    if not wf.origin:  # a network written here: no file to download, a converted one
        return (
            f"could not obtain the ImageNet weights for backbone {name!r}: {reason}\n"
            f"  file: {wf.fname}\n"
            "Either:\n"
            "  - train from scratch: model.weights=null\n"
            f"  - or use a local copy: convert the timm/torchvision ImageNet checkpoint (a .safetensors or "
            f".npz state dict, on any machine) with `python -m src.models.convert {name} <checkpoint> "
            f"{wf.fname}` and pass model.weights=/path/to/{wf.fname}; or place it in ~/.keras/models/ "
            f"(here: {cached}) and keep model.weights=imagenet."
        )
    return (
        f"could not obtain the ImageNet weights for backbone {name!r}: {reason}\n"
        f"  file: {wf.fname}\n  from: {wf.origin}\n"
        "Pretrained weights need the internet. Either:\n"
        "  - train from scratch: model.weights=null\n"
        f"  - or use a local copy: download {wf.fname} (from the URL above, on a machine with a network) "
        f"and pass model.weights=/path/to/{wf.fname}; or place it in ~/.keras/models/ "
        f"(here: {cached}) and keep model.weights=imagenet."
    )


def _probe(url: str, timeout: float) -> None:
    """Fail fast when the weights server cannot be reached (HEAD with a timeout)."""
    req = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(req, timeout=timeout):
            return
    except urllib.error.HTTPError as e:
        if e.code in (405, 501):  # HEAD not supported: the server is there, let get_file try
            return
        raise WeightsUnavailableError(f"HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise WeightsUnavailableError(f"server not reachable ({reason})") from e
