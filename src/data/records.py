"""One record schema for every dataset.

Every reader (folder, coco, yolo, roboflow_csv, figshare, roboflow, phantom) yields
:class:`Record` objects. Downstream code (splits, the tf.data pipeline, curation,
evaluation) only ever sees records, never a dataset's own layout.

Conventions
-----------
* ``label`` is a *canonical* class name (see :class:`ClassMap`) or ``None`` when the
  image's class is not known. ``"tumor"`` is the generic tumour class of datasets that
  do not name the subtype (Br35H, the tiny Roboflow set).
* ``boxes`` are normalised ``[x_min, y_min, x_max, y_max]`` in ``[0, 1]`` with
  ``x_max > x_min`` and ``y_max > y_min``; ``box_classes`` holds one canonical class name
  per box. Any number of boxes per image.
* ``mask`` is a path to a single-channel mask file (non-zero = tumour) or ``None``;
  ``polygons`` holds normalised polygons (each an ``(K, 2)`` array of x, y in [0, 1]),
  all instances of the image; :func:`src.data.masks.materialise_masks` rasterises them
  into mask files so the pipeline reads one kind of mask.
* A *known-empty* mask (a tumour-free slice) is ``mask=None`` with ``known["mask"]=True``
  (and no polygons); the pipeline turns it into an all-zero mask with weight 1.
* ``known`` says which targets are annotated. An unknown target is *not* a negative:
  the pipeline gives it sample weight 0.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

CANONICAL_CLASSES: tuple[str, ...] = ("glioma", "meningioma", "pituitary", "no_tumor")
TUMOR = "tumor"  # generic tumour of unknown subtype
NO_TUMOR = "no_tumor"
TARGETS: tuple[str, ...] = ("label", "boxes", "mask")

# One alias table for every reader. Keys are normalised with :func:`_norm`.
DEFAULT_ALIASES: dict[str, str] = {
    "glioma": "glioma",
    "glioma_tumor": "glioma",
    "glioma_tumour": "glioma",
    "gl": "glioma",
    "meningioma": "meningioma",
    "meningioma_tumor": "meningioma",
    "meningioma_tumour": "meningioma",
    "me": "meningioma",
    "pituitary": "pituitary",
    "pituitary_tumor": "pituitary",
    "pituitary_tumour": "pituitary",
    "pi": "pituitary",
    "no_tumor": "no_tumor",
    "no_tumour": "no_tumor",
    "notumor": "no_tumor",
    "notumour": "no_tumor",
    "no": "no_tumor",
    "healthy": "no_tumor",
    "normal": "no_tumor",
    "tumor": TUMOR,
    "tumour": TUMOR,
    "brain_tumor": TUMOR,
    "brain_tumour": TUMOR,
    "object": TUMOR,
    "yes": TUMOR,
}


class DataError(ValueError):
    """A problem with the input data. The message always names the offending file."""


def _norm(name: str) -> str:
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")


class ClassMap:
    """Maps dataset class names (aliases) to canonical names, and canonical names to ids.

    ``classes`` is the ordered list of classes the model predicts (ids are positions).
    ``aliases`` extends/overrides :data:`DEFAULT_ALIASES` (from config ``data.aliases``).
    """

    def __init__(self, classes: Sequence[str] = CANONICAL_CLASSES,
                 aliases: Optional[Mapping[str, str]] = None):
        self.aliases = dict(DEFAULT_ALIASES)
        for k, v in (aliases or {}).items():
            self.aliases[_norm(k)] = _norm(v)
        self.classes = tuple(self.canonical(c) for c in classes)
        if len(set(self.classes)) != len(self.classes):
            raise DataError(f"data.classes has repeated classes after alias mapping: {list(classes)}")

    def canonical(self, name: str, where: str = "") -> str:
        """Canonical name for ``name``; raises :class:`DataError` for an unknown one."""
        key = _norm(name)
        if key in self.aliases:
            return self.aliases[key]
        if key in {_norm(c) for c in CANONICAL_CLASSES} or key == TUMOR:
            return key
        known = sorted(set(self.aliases))
        raise DataError(
            f"unknown class name {name!r}{' in ' + where if where else ''}; known names: {known}. "
            "Add it to data.aliases (e.g. data.aliases={" + repr(name) + ": glioma}).")

    def try_canonical(self, name: str) -> Optional[str]:
        try:
            return self.canonical(name)
        except DataError:
            return None

    def index(self, name: Optional[str]) -> int:
        """Class id of a canonical name, or -1 when it is not one of ``classes``."""
        if name is None or name not in self.classes:
            return -1
        return self.classes.index(name)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def tumor_classes(self) -> tuple[str, ...]:
        return tuple(c for c in self.classes if c != NO_TUMOR)

    def to_dict(self) -> dict:
        return {"classes": list(self.classes)}


@dataclass
class Record:
    """One image and what is known about it."""

    image: str  # path to the image file
    label: Optional[str] = None
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    box_classes: tuple[str, ...] = ()
    mask: Optional[str] = None
    polygons: Optional[list] = None
    group: Optional[str] = None
    source: str = ""
    split: Optional[str] = None
    known: dict = field(default_factory=lambda: {"label": False, "boxes": False, "mask": False})
    width: Optional[int] = None
    height: Optional[int] = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.image = str(self.image)
        b = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        self.boxes = b
        self.box_classes = tuple(self.box_classes)
        if len(self.box_classes) != len(b):
            raise DataError(f"{self.image}: {len(b)} boxes but {len(self.box_classes)} box classes")
        for t in TARGETS:
            self.known.setdefault(t, False)

    # ---- validation ---------------------------------------------------------------
    def validate(self, tol: float = 1e-3) -> None:
        """Raise :class:`DataError` naming the file when the record is inconsistent."""
        b = self.boxes
        if len(b):
            if not np.all(np.isfinite(b)):
                raise DataError(f"{self.image}: non-finite box coordinates {b.tolist()}")
            if np.any(b < -tol) or np.any(b > 1 + tol):
                raise DataError(f"{self.image}: box outside the image (normalised xyxy {b.tolist()})")
            if np.any(b[:, 2] <= b[:, 0]) or np.any(b[:, 3] <= b[:, 1]):
                raise DataError(f"{self.image}: empty or inverted box (normalised xyxy {b.tolist()})")
        for poly in self.polygons or []:
            p = np.asarray(poly, np.float32)
            if p.ndim != 2 or p.shape[1] != 2 or len(p) < 3:
                raise DataError(f"{self.image}: polygon needs at least 3 (x, y) points, got shape {p.shape}")
            if np.any(p < -tol) or np.any(p > 1 + tol):
                raise DataError(f"{self.image}: polygon outside the image")

    # ---- derived ------------------------------------------------------------------
    @property
    def has_tumor(self) -> Optional[bool]:
        if not self.known.get("label") or self.label is None:
            return None
        return self.label != NO_TUMOR

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["boxes"] = np.asarray(self.boxes).round(6).tolist()
        d["box_classes"] = list(self.box_classes)
        if self.polygons is not None:
            d["polygons"] = [np.asarray(p).round(6).tolist() for p in self.polygons]
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Record":
        d = dict(d)
        if d.get("polygons") is not None:
            d["polygons"] = [np.asarray(p, np.float32) for p in d["polygons"]]
        return cls(**d)


def clip_boxes(boxes: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(boxes, np.float32).reshape(-1, 4), 0.0, 1.0)


def polygon_to_box(poly: np.ndarray) -> np.ndarray:
    p = np.asarray(poly, np.float32).reshape(-1, 2)
    return np.array([p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()], np.float32)


def save_manifest(records: Iterable[Record], path: str | Path) -> Path:
    """Write records as JSON lines (a manifest every reader can take as ``data.manifest``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r.to_json()) + "\n")
    return path


def load_manifest(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"manifest {path} does not exist")
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(Record.from_json(json.loads(line)))
                except (json.JSONDecodeError, TypeError) as e:
                    raise DataError(f"{path}:{i}: not a record ({e})") from e
    return out
