"""Convert a timm / torchvision ImageNet checkpoint into a weights file of a backbone written here.

    python -m src.models.convert resnet18 resnet18.safetensors ~/.keras/models/resnet18_imagenet_notop.weights.h5

Then ``model.weights=imagenet`` finds it (in ``~/.keras/models`` under that name) or
``model.weights=/path/to/file`` loads it. Input: the checkpoint's state dict as
``.safetensors`` (what the Hugging Face hub serves for timm models, e.g.
``timm/resnet18.a1_in1k``, ``timm/vit_base_patch16_224.augreg2_in21k_ft_in1k``,
``timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k``, ``timm/swin_tiny_patch4_window7_224.ms_in1k``,
``timm/resnext50_32x4d.a1h_in1k``; read with numpy, no torch needed) or ``.npz`` (a state
dict saved with ``numpy.savez(path, **{k: v.numpy() for k, v in state_dict.items()})`` from
a ``.pth`` file where torch is installed).

Names map one tensor to one weight (the networks keep timm's structure, see
:mod:`src.models.resnet`, :mod:`src.models.vit`, :mod:`src.models.swin`): convolution
kernels ``[out, in, kh, kw] -> [kh, kw, in, out]``, linear weights transposed, BatchNorm
``weight, bias, running_mean, running_var -> gamma, beta, moving_mean, moving_variance``.
The classification top (``fc.*``, ``head.*``) and buffers (``num_batches_tracked``,
``relative_position_index``, ``attn_mask``) are left out; any other tensor that finds no
weight, or a backbone weight that no tensor fills, is an error naming it. Swin checkpoints in
the layout before timm 0.9 (patch merging at the end of a stage) are read too.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

_SKIP = re.compile(r"^(fc|head|classifier)\.|num_batches_tracked$|relative_position_index$|attn_mask$")
_BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
_LN = {"weight": "gamma", "bias": "beta"}
_DT = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


class ConversionError(ValueError):
    """A checkpoint that does not fit the backbone (named in the message)."""


def read_state_dict(path) -> dict[str, np.ndarray]:
    """``{name: array}`` of a ``.safetensors`` or ``.npz`` state dict (float arrays as float32)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".npz":
        with np.load(path) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    if path.suffix != ".safetensors":
        raise ConversionError(f"{path}: give a .safetensors or .npz state dict (a .pth file needs torch: save it "
                              "with numpy.savez(path, **{k: v.numpy() for k, v in sd.items()}))")
    raw = path.read_bytes()
    n = int(np.frombuffer(raw[:8], "<u8")[0])
    header = json.loads(raw[8:8 + n])
    base, out = 8 + n, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = raw[base + a:base + b]
        if info["dtype"] == "BF16":
            arr = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in _DT:
            arr = np.frombuffer(buf, np.dtype(_DT[info["dtype"]]).newbyteorder("<"))
        else:
            raise ConversionError(f"{path}: tensor {key} has dtype {info['dtype']}, not a float or int")
        out[key] = arr.reshape(tuple(info["shape"]))
    return out


def _kernel(a):
    return np.transpose(a, (2, 3, 1, 0)) if a.ndim == 4 else np.transpose(a)


def _resnet_key(k: str) -> str | None:
    if k == "conv1.weight":
        return "conv1_conv/kernel"
    m = re.fullmatch(r"bn1\.(\w+)", k)
    if m:
        return f"conv1_bn/{_BN[m.group(1)]}"
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv|bn)(\d)\.(\w+)", k)
    if m:
        s, b, kind, i, p = int(m.group(1)) + 1, int(m.group(2)) + 1, m.group(3), m.group(4), m.group(5)
        return f"conv{s}_block{b}_{i}_conv/kernel" if kind == "conv" else f"conv{s}_block{b}_{i}_bn/{_BN[p]}"
    m = re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.([01])\.(\w+)", k)
    if m:
        s, b, i, p = int(m.group(1)) + 1, int(m.group(2)) + 1, m.group(3), m.group(4)
        return f"conv{s}_block{b}_0_conv/kernel" if i == "0" else f"conv{s}_block{b}_0_bn/{_BN[p]}"
    return None


def _block_key(prefix: str, rest: str) -> str | None:
    """A transformer block's tensor (timm names after ``blocks.i.``)."""
    m = re.fullmatch(r"(norm1|norm2)\.(weight|bias)", rest)
    if m:
        return f"{prefix}/{m.group(1)}/{_LN[m.group(2)]}"
    m = re.fullmatch(r"(?:attn|mlp)\.(qkv|proj|fc1|fc2)\.(weight|bias)", rest)
    if m:
        return f"{prefix}/{m.group(1)}/{'kernel' if m.group(2) == 'weight' else 'bias'}"
    if rest == "attn.relative_position_bias_table":
        return f"{prefix}/relative_position_bias_table"
    return None


def _vit_key(k: str) -> str | None:
    fixed = {"patch_embed.proj.weight": "patch_embed/kernel", "patch_embed.proj.bias": "patch_embed/bias",
             "cls_token": "cls_token/token", "pos_embed": "pos_embed/embedding", "norm.weight": "norm/gamma",
             "norm.bias": "norm/beta"}
    if k in fixed:
        return fixed[k]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", k)
    return _block_key(f"block{m.group(1)}", m.group(2)) if m else None


def _swin_key(k: str, old_layout: bool) -> str | None:
    fixed = {"patch_embed.proj.weight": "patch_embed/kernel", "patch_embed.proj.bias": "patch_embed/bias",
             "patch_embed.norm.weight": "patch_embed_norm/gamma", "patch_embed.norm.bias": "patch_embed_norm/beta",
             "norm.weight": "norm/gamma", "norm.bias": "norm/beta"}
    if k in fixed:
        return fixed[k]
    m = re.fullmatch(r"layers\.(\d)\.blocks\.(\d+)\.(.+)", k)
    if m:
        return _block_key(f"stage{int(m.group(1)) + 1}_block{m.group(2)}", m.group(3))
    m = re.fullmatch(r"layers\.(\d)\.downsample\.(norm|reduction)\.(weight|bias)", k)
    if m:
        stage = int(m.group(1)) + (2 if old_layout else 1)  # old timm: merging at the end of the stage before
        if m.group(2) == "norm":
            return f"stage{stage}_merge/norm/{_LN[m.group(3)]}"
        return f"stage{stage}_merge/reduction/kernel"
    return None


def keras_path(architecture: str, key: str, old_layout: bool = False) -> str | None:
    """The backbone weight a checkpoint tensor fills (None: not a backbone tensor)."""
    if architecture.startswith(("resnet", "resnext")):
        return _resnet_key(key)
    if architecture.startswith("vit"):
        return _vit_key(key)
    if architecture.startswith("swin"):
        return _swin_key(key, old_layout)
    raise ConversionError(f"no converter for backbone {architecture!r} (resnet18, resnet34, resnext50, vit_*, swin_*)")


def convert(architecture: str, state: dict, image_size: int = 224):
    """A :class:`~src.models.backbones.Backbone` ``architecture`` holding the ``state`` tensors."""
    from .backbones import create_backbone

    bb = create_backbone(architecture, (image_size, image_size, 3), weights=None)
    variables = {v.path: v for v in bb.weights}
    old = any(re.fullmatch(r"layers\.0\.downsample\..+", k) for k in state)
    filled, unused = set(), []
    for key, arr in state.items():
        if _SKIP.search(key):
            continue
        path = keras_path(architecture, key, old)
        if path is None or path not in variables:
            unused.append(key)
            continue
        value = _kernel(arr) if path.endswith("/kernel") else arr
        v = variables[path]
        if tuple(value.shape) != tuple(v.shape):
            raise ConversionError(f"{key} {tuple(arr.shape)} does not fit {path} {tuple(v.shape)} of {architecture}")
        v.assign(value.astype(np.float32))
        filled.add(path)
    missing = sorted(set(variables) - filled)
    if unused or missing:
        raise ConversionError(f"checkpoint does not fit {architecture}: tensors without a weight {unused[:8]}"
                              f"{' ...' if len(unused) > 8 else ''}; weights without a tensor {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}")
    return bb


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m src.models.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("backbone", help="resnet18 | resnet34 | resnext50 | vit_tiny | vit_b16 | swin_tiny")
    p.add_argument("checkpoint", help="the timm / torchvision state dict: .safetensors or .npz")
    p.add_argument("out", help="the weights file to write (ending in .weights.h5)")
    args = p.parse_args(argv)
    if not args.out.endswith(".weights.h5"):
        print(f"error: out must end in .weights.h5, got {args.out}", file=sys.stderr)
        return 2
    try:
        bb = convert(args.backbone, read_state_dict(args.checkpoint))
    except (ConversionError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    bb.save_weights(str(out))
    print(f"{args.backbone}: {len(bb.weights)} weights from {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
