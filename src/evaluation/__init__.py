"""Evaluation: metrics, plots and reports (``python -m src.evaluate``), efficiency and explainability tools."""
