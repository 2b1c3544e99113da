"""Temporary re-export shim: unfreezing moved to :mod:`src.models.unfreeze` (beside the
backbones whose stages it uses). Kept only while ``src/training/engine.py`` imports from
here; new code must import :mod:`src.models.unfreeze`."""
from ..models.unfreeze import MODES, count_params, parse_spec, set_trainable  # noqa: F401
