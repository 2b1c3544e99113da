"""Tests of src.evaluation and src.evaluate."""
