"""Training: the engine (phases, chaining, resume, budget), callbacks, compiled metrics,
optimizers, precision and strategy. (The task model is :mod:`src.models.task`.)"""
