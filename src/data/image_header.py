"""Image files before decoding (for :mod:`src.data.pipeline`): what the header says
(format, size, grey or colour; :func:`probe_header`), the frame an image takes in the
target size, the JPEG DCT scale that reaches it without upsampling, and, in the graph,
the decoder of each format and the check of the file's signature."""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from .records import DataError


@dataclass
class ImageInfo:
    fmt: str        # jpeg | png | bmp | gif
    width: int
    height: int
    channels: int   # 1 (grey) or 3 (anything else)
    clean_end: bool  # JPEG whose last two bytes are the end-of-image marker


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def probe_header(path: str | Path) -> ImageInfo:
    """Format, size and channel count from the file header; :class:`DataError` names
    the file when it is missing, empty, not an image or of an unsupported format."""
    p = str(path)
    try:
        with open(p, "rb") as f:
            head = f.read(32)
            if not head:
                raise DataError(f"{p}: corrupt image (empty file)")
            if head[:3] == b"\xff\xd8\xff":
                f.seek(2)
                while True:
                    b = f.read(1)
                    while b == b"\xff":
                        b = f.read(1)
                    if not b:
                        raise DataError(f"{p}: corrupt JPEG (no frame header)")
                    marker = b[0]
                    if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                        continue
                    if marker in (0xD9, 0xDA):
                        raise DataError(f"{p}: corrupt JPEG (no frame header before the scan)")
                    ln = f.read(2)
                    if len(ln) < 2:
                        raise DataError(f"{p}: corrupt JPEG (truncated header)")
                    seg = struct.unpack(">H", ln)[0]
                    if marker in _SOF:
                        d = f.read(6)
                        if len(d) < 6:
                            raise DataError(f"{p}: corrupt JPEG (truncated frame header)")
                        _, h, w, nc = struct.unpack(">BHHB", d)
                        break
                    f.seek(seg - 2, 1)
                f.seek(-2, 2)
                clean = f.read(2) == b"\xff\xd9"
                info = ImageInfo("jpeg", w, h, 1 if nc == 1 else 3, clean)
            elif head[:8] == b"\x89PNG\r\n\x1a\n":
                if len(head) < 26:
                    raise DataError(f"{p}: corrupt PNG (truncated header)")
                w, h = struct.unpack(">II", head[16:24])
                ctype = head[25]
                info = ImageInfo("png", w, h, 1 if ctype in (0, 4) else 3, False)
            elif head[:2] == b"BM":
                w, h = struct.unpack("<ii", head[18:26])
                info = ImageInfo("bmp", w, abs(h), 3, False)
            elif head[:4] == b"GIF8":
                w, h = struct.unpack("<HH", head[6:10])
                info = ImageInfo("gif", w, h, 3, False)
            else:
                raise DataError(f"{p}: unsupported or corrupt image (not JPEG, PNG, BMP or GIF by its signature)")
    except FileNotFoundError as e:
        raise DataError(f"{p}: image file not found") from e
    except OSError as e:
        raise DataError(f"{p}: unreadable image ({e})") from e
    if info.width <= 0 or info.height <= 0:
        raise DataError(f"{p}: corrupt image (size {info.width}x{info.height})")
    return info


_SIGNATURES = {"jpeg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n", "bmp": b"BM", "gif": b"GIF8"}


_FMT_IDS = {"jpeg": 0, "png": 1, "bmp": 2, "gif": 3}


def _fit(h: int, w: int, size, mode: str):
    """(content_h, content_w, top, left) of an h x w image in the target frame."""
    H, W = size
    if mode == "stretch":
        return H, W, 0, 0
    s = min(H / h, W / w)
    nh = min(H, max(1, int(round(h * s))))
    nw = min(W, max(1, int(round(w * s))))
    return nh, nw, (H - nh) // 2, (W - nw) // 2


def _dct_ratio(h: int, w: int, nh: int, nw: int) -> int:
    for r in (8, 4, 2):
        if math.ceil(h / r) >= nh and math.ceil(w / r) >= nw:
            return r
    return 1


def _decoder(fmt: str, ratio: int, channels: int):
    def dec(data):
        if fmt == "jpeg":
            return tf.io.decode_jpeg(data, channels=channels, ratio=ratio)
        if fmt == "png":
            return tf.io.decode_png(data, channels=channels, dtype=tf.uint8)
        return tf.io.decode_image(data, channels=channels, dtype=tf.uint8, expand_animations=False)
    return dec


def _signature_ok(data, fmt, clean_end):
    """In-graph check of the file signature (and JPEG end marker) for the given format."""
    checks = []
    for name, fid in _FMT_IDS.items():
        sig = _SIGNATURES[name]
        checks.append(tf.logical_and(tf.equal(fmt, fid), tf.equal(tf.strings.substr(data, 0, len(sig)), sig)))
    ok = tf.reduce_any(tf.stack(checks))
    n = tf.strings.length(data)
    tail = tf.strings.substr(data, tf.maximum(n - 2, 0), 2)
    return tf.logical_and(ok, tf.logical_or(tf.logical_not(clean_end), tf.equal(tail, b"\xff\xd9")))
