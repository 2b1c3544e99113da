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


#: ``auto`` on a CPU with native bf16 picks bfloat16 only for networks at least this large:
#: there bf16 pays for its casts (the published U-Net, 32 M parameters: 2x faster), while
#: for the small CPU models it does not (the 0.5 M U-Net preset 30% slower, EfficientMTNet
#: 1.4 M and small_cnn 1.1 M about even; benchmarks/results/train.json)
CPU_BF16_MIN_PARAMS = 5_000_000


def resolve_precision(precision: str, n_params: int | None = None) -> str:
    """'auto' -> mixed_float16 on GPU; on a CPU with native bf16 (AVX512-BF16 / AMX)
    mixed_bfloat16 for networks of at least :data:`CPU_BF16_MIN_PARAMS` parameters
    (``n_params``; unknown counts as large), else float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    if not cpu_has_bf16():
        return "float32"
    return "mixed_bfloat16" if n_params is None or n_params >= CPU_BF16_MIN_PARAMS else "float32"


def auto_depends_on_size(precision: str) -> bool:
    """``auto`` whose answer depends on the network's size (a CPU with native bf16, no GPU)."""
    if precision != "auto" or not cpu_has_bf16():
        return False
    import tensorflow as tf

    return not tf.config.list_physical_devices("GPU")


def set_precision(precision: str, n_params: int | None = None) -> str:
    import keras

    policy = resolve_precision(precision, n_params)
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
