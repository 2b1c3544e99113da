"""trainer.precision=auto: GPU -> float16; CPU with native bf16 -> bfloat16 for large networks
only; any other CPU -> float32; explicit settings are kept."""
import pytest

import src.training.precision as precision


@pytest.fixture
def cpu(monkeypatch):
    import tensorflow as tf

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    return monkeypatch


def test_auto_on_cpus_with_and_without_bf16(cpu):
    big, small = precision.CPU_BF16_MIN_PARAMS, precision.CPU_BF16_MIN_PARAMS // 10
    cpu.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.resolve_precision("auto", big) == "mixed_bfloat16"
    assert precision.resolve_precision("auto", small) == "float32"
    assert precision.auto_depends_on_size("auto") and not precision.auto_depends_on_size("float32")
    cpu.setattr(precision, "cpu_has_bf16", lambda: False)           # AVX2 only: bf16 is emulated, slow
    assert precision.resolve_precision("auto", big) == "float32"
    assert not precision.auto_depends_on_size("auto")
    assert precision.resolve_precision("mixed_bfloat16", small) == "mixed_bfloat16"
    with pytest.raises(ValueError, match="trainer.precision"):
        precision.resolve_precision("half")


def test_auto_on_gpu(monkeypatch):
    import tensorflow as tf

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    assert precision.resolve_precision("auto", 10) == "mixed_float16"
    assert not precision.auto_depends_on_size("auto")
