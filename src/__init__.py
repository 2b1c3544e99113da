"""BrainTumorMTL: multi-head Keras 3 models for brain-tumour MRI."""
__version__ = "0.1.0"
