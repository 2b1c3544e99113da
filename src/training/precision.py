"""Mixed precision policy selection (``trainer.precision``)."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16", "auto")


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def resolve_precision(precision: str) -> str:
    """'auto' -> mixed_float16 on GPU, mixed_bfloat16 on CPUs with native bf16, else float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    return "mixed_bfloat16" if cpu_has_bf16() else "float32"


def set_precision(precision: str) -> str:
    import keras

    policy = resolve_precision(precision)
    keras.mixed_precision.set_global_policy(policy)
    log.info("precision policy: %s", policy)
    return policy


def resolve_jit(jit_compile) -> bool:
    """'auto' -> XLA on GPU only (it is slower on CPU)."""
    if isinstance(jit_compile, bool):
        return jit_compile
    if str(jit_compile).lower() in ("true", "1", "yes"):
        return True
    if str(jit_compile).lower() in ("false", "0", "no", "none"):
        return False
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))
