"""Evaluation (the library of ``python -m src.evaluate`` and ``src.explain``): collect (one
pass of a model over a split), compute (metrics per head, headline, predictions.csv), metrics
and detection (the reference implementations), plots, report (the report folder and
report.html), tracking (the report into MLflow), gradcam, embeddings, efficiency."""
