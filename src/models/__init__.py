"""Models: a registry of architectures built from backbones and heads."""
from .registry import create_model, list_models, register_model  # noqa: F401
