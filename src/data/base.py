"""Reader base class, reader registry, error policy and image probing."""
from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Callable, Optional

from .records import ClassMap, DataError, Record

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}

READERS: dict[str, type["Reader"]] = {}


def register_reader(name: str) -> Callable[[type], type]:
    def deco(cls):
        cls.name = name
        READERS[name] = cls
        return cls
    return deco


def get_reader(name: str) -> type["Reader"]:
    # import for registration side effects
    from . import readers  # noqa: F401
    if name not in READERS:
        raise DataError(f"unknown data reader {name!r}; available: {sorted(READERS)}")
    return READERS[name]


class SkipLog:
    """Files skipped under ``data.on_error=skip``, counted by reason, reported in summaries."""

    def __init__(self):
        self.items: list[tuple[str, str]] = []

    def add(self, path: str, reason: str) -> None:
        path = str(path)
        for prefix in (path + ": ", path + ":"):
            if reason.startswith(prefix):
                reason = reason[len(prefix):]
        self.items.append((path, reason))

    @staticmethod
    def kind(reason: str) -> str:
        """The reason without its details: text before the first ' (' or ':'."""
        import re
        head = re.split(r" \(|:", reason, maxsplit=1)[0].strip()
        return re.sub(r"\d+", "N", head) or "error"

    def __len__(self) -> int:
        return len(self.items)

    def summary(self, max_examples: int = 20) -> dict:
        by_reason = collections.Counter(self.kind(r) for _, r in self.items)
        return {
            "count": len(self.items),
            "by_reason": dict(by_reason),
            "examples": [{"path": p, "reason": r} for p, r in self.items[:max_examples]],
        }


#: options every reader accepts
COMMON_OPTIONS = ("source", "workers")


class Reader:
    """Base class: a reader turns a dataset on disk into :class:`Record` objects.

    Subclasses implement :meth:`read_records`. Errors go through :meth:`fail`, which
    raises :class:`DataError` (``on_error='raise'``, the default) or records a skip
    (``on_error='skip'``) that is counted in :attr:`skipped`.
    """

    name = "base"

    def __init__(self, root: str | Path, class_map: Optional[ClassMap] = None,
                 on_error: str = "raise", **options):
        if on_error not in ("raise", "skip"):
            raise DataError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
        self.root = Path(root).expanduser()
        self.class_map = class_map or ClassMap()
        self.on_error = on_error
        self.options = options
        self.skipped = SkipLog()

    # subclasses -------------------------------------------------------------------
    def read_records(self) -> list[Record]:
        raise NotImplementedError

    # public -----------------------------------------------------------------------
    def read(self) -> list[Record]:
        if not self.root.exists():
            raise DataError(f"data.root {self.root} does not exist (reader {self.name!r}). "
                            "Point data.root at the dataset folder.")
        records = []
        for r in self.read_records():
            try:
                r.validate()
            except DataError as e:
                self.fail(r.image, str(e))
                continue
            records.append(r)
        if not records:
            raise DataError(f"empty dataset: reader {self.name!r} found no usable images under {self.root}"
                            + (f" ({len(self.skipped)} skipped: {self.skipped.summary(3)})" if len(self.skipped) else ""))
        return records

    def check_options(self, allowed) -> None:
        """Raise :class:`DataError` for an option the reader does not know (no silent typos)."""
        allowed = set(COMMON_OPTIONS) | set(allowed)
        unknown = sorted(set(self.options) - allowed)
        if unknown:
            raise DataError(f"reader {self.name!r} (data.root {self.root}) got unknown option(s) "
                            f"{unknown}; it accepts {sorted(allowed)}")

    def unannotated_mode(self) -> str:
        """The ``unannotated`` option: ``unknown`` (images without annotation are unlabelled,
        the default) or ``negative`` (they are healthy slices), checked."""
        mode = self.options.get("unannotated", "unknown")
        if mode not in ("unknown", "negative"):
            raise DataError(f"reader {self.name!r}: unannotated={mode!r}; use 'unknown' (images without "
                            "annotation are unlabelled, the default) or 'negative' (they are healthy slices)")
        return mode

    def fail(self, path, message: str) -> None:
        """Raise a :class:`DataError` or record a skip, depending on ``on_error``."""
        msg = message if str(path) in message else f"{path}: {message}"
        if self.on_error == "raise":
            raise DataError(msg + "  (set data.on_error=skip to skip such files and count them)")
        log.warning("skipping %s", msg)
        self.skipped.add(str(path), message)

    def probe(self, path: Path) -> Optional[tuple[int, int]]:
        """(width, height) of a readable image, else ``fail`` and return None."""
        try:
            return probe_image(path)
        except DataError as e:
            self.fail(path, str(e))
            return None


class AnnotationFileReader(Reader):
    """A reader whose annotations are one file per split folder (``<root>/<split>/<file>``)
    or one file in the root itself (COCO JSON, Roboflow CSV).

    Subclasses set :attr:`annotation_file` and implement :meth:`_read_file` (one file's
    records); :meth:`after_read` may report on the whole read.
    """

    #: default file name (``annotation_file`` option overrides it)
    ANNOTATION_FILE = ""

    def __init__(self, root, class_map=None, on_error="raise", **options):
        super().__init__(root, class_map=class_map, on_error=on_error, **options)
        self.check_options(getattr(self, "OPTIONS", ()))
        self.source = self.options.get("source", self.name)
        self.annotation_file = str(self.options.get("annotation_file", self.ANNOTATION_FILE))
        self.unannotated = self.unannotated_mode()

    def annotation_files(self) -> list[tuple[Optional[str], Path]]:
        """``[(split or None, path)]``: the root's own file, else one per split folder."""
        direct = self.root / self.annotation_file
        if direct.is_file():
            return [(canonical_split(self.root.name), direct)]
        found = [(canonical_split(d.name), d / self.annotation_file)
                 for d in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
                 if (d / self.annotation_file).is_file()]
        if not found:
            raise DataError(f"{self.root}: no {self.annotation_file} found, neither in the folder nor in "
                            f"split folders (<root>/<split>/{self.annotation_file})")
        return found

    def read_records(self) -> list[Record]:
        if not self.root.is_dir():
            raise DataError(f"{self.root}: reader {self.name!r} needs a folder")
        records: list[Record] = []
        for split, ann in self.annotation_files():
            records.extend(self._read_file(ann, split))
        self.after_read()
        records.sort(key=lambda r: r.image)
        return records

    def _read_file(self, ann: Path, split: Optional[str]) -> list[Record]:
        raise NotImplementedError

    def after_read(self) -> None:
        """Called once after every file was read (e.g. to log what was dropped)."""


def probe_image(path: str | Path) -> tuple[int, int]:
    """Cheap check that ``path`` is a readable image; returns (width, height).

    Reads the header only (PIL), plus the JPEG end-of-image marker, so truncated and
    corrupt files are caught here with the file named, not deep inside tf.data.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: image file not found")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: corrupt image (empty file)")
    try:
        with Image.open(p) as im:
            fmt = im.format
            w, h = im.size
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{p}: corrupt or unreadable image ({e.__class__.__name__}: {e})") from e
    if fmt == "JPEG":
        with open(p, "rb") as f:
            f.seek(max(0, p.stat().st_size - 4096))
            tail = f.read()
        if b"\xff\xd9" not in tail:
            raise DataError(f"{p}: corrupt image (truncated JPEG: no end-of-image marker)")
    if w <= 0 or h <= 0:
        raise DataError(f"{p}: corrupt image (size {w}x{h})")
    return int(w), int(h)


def image_format(path: str | Path) -> str:
    """'jpeg' or 'png' or 'other' from the file signature (not the extension)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return "other"


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def canonical_split(name: str) -> Optional[str]:
    return SPLIT_ALIASES.get(str(name).strip().lower())
