"""``phantom`` reader: the embedded synthetic dataset, generated on first use.

``root`` is where the dataset lives (it need not exist). On :meth:`read`, when
``<root>/phantom.json`` is missing or records other parameters or another generator
version, the dataset is (re)generated into ``root`` by
:func:`src.data.phantom.ensure_phantom` (into a temporary folder renamed into place, under
an inter-process lock, so a killed run never leaves a half dataset and two processes
never generate at once). The files are then read by the ``yolo`` reader; each record
gets ``source="phantom"`` and ``group`` = the patient id from the file stem
(``p0003_s01`` -> ``p0003``), so splits can be group-aware.

Options (see :func:`src.data.phantom.generate_phantom`): ``n_patients`` (200),
``image_size`` (256), ``seed`` (0), ``slices`` ([2, 6]), ``splits`` ([0.7, 0.15, 0.15] or
``{train: .., val: .., test: ..}``), ``fmt`` (png | jpg), ``class_probs`` (null = uniform,
or ``{glioma: .., meningioma: .., pituitary: .., no_tumor: ..}``), ``workers``
(generation processes and probe threads; the bytes do not depend on it).
"""
from __future__ import annotations

from pathlib import Path

from ..base import Reader, get_reader, register_reader
from ..phantom import DEFAULTS, ensure_phantom, normalise_params
from ..records import DataError, Record

GEN_OPTIONS = ("n_patients", "image_size", "seed", "slices", "splits", "fmt", "class_probs")


@register_reader("phantom")
class PhantomReader(Reader):
    """Synthetic MRI-like slices, generated into ``root`` when missing or out of date."""

    OPTIONS = GEN_OPTIONS + ("workers", "source")

    def __init__(self, root, class_map=None, on_error="raise", **options):
        super().__init__(root, class_map=class_map, on_error=on_error, **options)
        unknown = sorted(set(self.options) - set(self.OPTIONS))
        if unknown:
            raise DataError(f"reader 'phantom' (data.root {self.root}) got unknown option(s) {unknown}; "
                            f"it accepts {sorted(self.OPTIONS)}")
        gen = {k: _plain(self.options.get(k, DEFAULTS[k])) for k in GEN_OPTIONS}
        self.params = normalise_params(**gen)  # fails early, naming the bad option
        self.summary: dict = {}

    def generate(self) -> dict:
        """Make sure ``root`` holds the phantom for these options; returns its metadata."""
        self.summary = ensure_phantom(self.root, workers=self.options.get("workers"), **self.params)
        return self.summary

    def read(self) -> list[Record]:
        # the base class refuses a missing root: this reader creates it
        self.generate()
        inner = get_reader("yolo")(self.root, self.class_map, self.on_error, source="phantom",
                                   **({"workers": self.options["workers"]} if "workers" in self.options else {}))
        records = inner.read()
        source = self.options.get("source", "phantom")
        self.skipped = inner.skipped
        for r in records:
            r.group = Path(r.image).stem.split("_")[0]
            r.source = source
        return records

    def read_records(self) -> list[Record]:
        return self.read()


def _plain(value):
    """OmegaConf containers (from Hydra) -> plain Python values."""
    try:
        from omegaconf import Container, OmegaConf
    except ImportError:  # pragma: no cover
        return value
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, Container) else value
