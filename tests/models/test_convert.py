"""Converting timm / torchvision state dicts (``.safetensors`` read with numpy, ``.npz``) into the
backbones written here. The state dicts are written out by hand in the torch layout (names
and ``[out, in, kh, kw]`` / ``[out, in]`` shapes of timm's modules), filled with random
numbers; every backbone weight must be filled, each from its tensor, transposed."""
from __future__ import annotations

import json

import numpy as np
import pytest

from src.models.backbones import create_backbone
from src.models.convert import ConversionError, convert, main, read_state_dict

RNG = np.random.default_rng(0)


def _r(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _bn(sd, prefix, c):
    sd.update({f"{prefix}.weight": _r(c), f"{prefix}.bias": _r(c), f"{prefix}.running_mean": _r(c),
               f"{prefix}.running_var": np.abs(_r(c)) + 0.5, f"{prefix}.num_batches_tracked": np.array(7)})


def resnet18_state():
    sd = {"conv1.weight": _r(64, 3, 7, 7), "fc.weight": _r(1000, 512), "fc.bias": _r(1000)}
    _bn(sd, "bn1", 64)
    inp = 64
    for li, planes in enumerate((64, 128, 256, 512)):
        for b in range(2):
            p = f"layer{li + 1}.{b}"
            sd[f"{p}.conv1.weight"] = _r(planes, inp if b == 0 else planes, 3, 3)
            sd[f"{p}.conv2.weight"] = _r(planes, planes, 3, 3)
            _bn(sd, f"{p}.bn1", planes)
            _bn(sd, f"{p}.bn2", planes)
            if b == 0 and li > 0:
                sd[f"{p}.downsample.0.weight"] = _r(planes, inp, 1, 1)
                _bn(sd, f"{p}.downsample.1", planes)
        inp = planes
    return sd


def _block(sd, p, d, heads=None):
    sd.update({f"{p}.norm1.weight": _r(d), f"{p}.norm1.bias": _r(d), f"{p}.attn.qkv.weight": _r(3 * d, d),
               f"{p}.attn.qkv.bias": _r(3 * d), f"{p}.attn.proj.weight": _r(d, d), f"{p}.attn.proj.bias": _r(d),
               f"{p}.norm2.weight": _r(d), f"{p}.norm2.bias": _r(d), f"{p}.mlp.fc1.weight": _r(4 * d, d),
               f"{p}.mlp.fc1.bias": _r(4 * d), f"{p}.mlp.fc2.weight": _r(d, 4 * d), f"{p}.mlp.fc2.bias": _r(d)})
    if heads:
        sd[f"{p}.attn.relative_position_bias_table"] = _r(169, heads)
        sd[f"{p}.attn.relative_position_index"] = np.zeros((49, 49), np.int64)


def vit_tiny_state():
    d = 192
    sd = {"patch_embed.proj.weight": _r(d, 3, 16, 16), "patch_embed.proj.bias": _r(d), "cls_token": _r(1, 1, d),
          "pos_embed": _r(1, 197, d), "norm.weight": _r(d), "norm.bias": _r(d), "head.weight": _r(1000, d),
          "head.bias": _r(1000)}
    for i in range(12):
        _block(sd, f"blocks.{i}", d)
    return sd


def swin_tiny_state():
    sd = {"patch_embed.proj.weight": _r(96, 3, 4, 4), "patch_embed.proj.bias": _r(96),
          "patch_embed.norm.weight": _r(96), "patch_embed.norm.bias": _r(96), "norm.weight": _r(768),
          "norm.bias": _r(768), "head.fc.weight": _r(1000, 768), "head.fc.bias": _r(1000)}
    for s, (depth, heads) in enumerate(zip((2, 2, 6, 2), (3, 6, 12, 24))):
        d = 96 * 2 ** s
        if s:
            sd.update({f"layers.{s}.downsample.norm.weight": _r(2 * d), f"layers.{s}.downsample.norm.bias": _r(2 * d),
                       f"layers.{s}.downsample.reduction.weight": _r(d, 2 * d)})
        for b in range(depth):
            _block(sd, f"layers.{s}.blocks.{b}", d, heads)
    return sd


def write_safetensors(path, sd):
    header, blobs, off = {}, [], 0
    for k, v in sd.items():
        v = np.asarray(v)  # (not ascontiguousarray: it makes a 0-d array 1-d)
        dt = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}[v.dtype]
        b = v.astype(v.dtype.newbyteorder("<")).tobytes()
        header[k] = {"dtype": dt, "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    path.write_bytes(np.array([len(h)], "<u8").tobytes() + h + b"".join(blobs))


@pytest.mark.parametrize("name,make", [("resnet18", resnet18_state), ("vit_tiny", vit_tiny_state),
                                       ("swin_tiny", swin_tiny_state)])
def test_every_weight_comes_from_its_tensor(tmp_path, name, make):
    sd = make()
    path = tmp_path / "model.safetensors"
    write_safetensors(path, sd)
    got = read_state_dict(path)
    assert sorted(got) == sorted(sd) and all(np.array_equal(got[k], sd[k]) for k in sd)
    bb = convert(name, got, image_size=32)
    w = {v.path: np.asarray(v) for v in bb.weights}
    if name == "resnet18":
        np.testing.assert_array_equal(w["conv1_conv/kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(w["conv3_block1_0_conv/kernel"][0, 0], sd["layer2.0.downsample.0.weight"][:, :, 0, 0].T)
        np.testing.assert_array_equal(w["conv5_block2_2_bn/moving_variance"], sd["layer4.1.bn2.running_var"])
    elif name == "vit_tiny":
        np.testing.assert_array_equal(w["block3/qkv/kernel"], sd["blocks.3.attn.qkv.weight"].T)
        np.testing.assert_array_equal(w["pos_embed/embedding"], sd["pos_embed"])
    else:
        np.testing.assert_array_equal(w["stage3_merge/reduction/kernel"], sd["layers.2.downsample.reduction.weight"].T)
        np.testing.assert_array_equal(w["stage4_block1/relative_position_bias_table"],
                                      sd["layers.3.blocks.1.attn.relative_position_bias_table"])


def test_cli_writes_a_file_the_backbone_loads_and_npz_input(tmp_path):
    sd = resnet18_state()
    np.savez(tmp_path / "r18.npz", **sd)
    out = tmp_path / "r18.weights.h5"
    assert main(["resnet18", str(tmp_path / "r18.npz"), str(out)]) == 0
    bb = create_backbone("resnet18", (32, 32, 3), weights=str(out))
    np.testing.assert_array_equal(np.asarray(bb.get_layer("conv1_bn").gamma), sd["bn1.weight"])


def test_a_checkpoint_of_another_network_names_what_does_not_fit(tmp_path):
    sd = resnet18_state()
    sd["layer1.0.conv1.weight"] = _r(64, 64, 5, 5)
    with pytest.raises(ConversionError, match=r"layer1.0.conv1.weight \(64, 64, 5, 5\)"):
        convert("resnet18", sd, image_size=32)
    sd = resnet18_state()
    del sd["layer4.1.bn2.weight"]
    sd["layer4.1.extra.weight"] = _r(3)
    with pytest.raises(ConversionError, match=r"layer4.1.extra.weight.*conv5_block2_2_bn/gamma"):
        convert("resnet18", sd, image_size=32)
    assert main(["resnet18", str(tmp_path / "none.safetensors"), str(tmp_path / "x.weights.h5")]) == 2
