"""Data layer: one record schema, many readers, splits and the tf.data pipeline."""
from .records import CANONICAL_CLASSES, ClassMap, DataError, Record  # noqa: F401
