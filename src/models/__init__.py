"""Models: a registry of architectures built from backbones, heads and shared layers, and the
task model every checkpoint holds (:mod:`src.models.task`)."""
from .registry import DATA_KEYS, ModelConfigError, builder_keys, create_model, list_models, register_model  # noqa: F401
