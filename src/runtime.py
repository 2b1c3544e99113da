"""A quiet TensorFlow start on machines without an NVIDIA GPU.

Importing TensorFlow's CUDA-enabled wheel on a CPU-only machine prints lines that read
like errors to a new user (``failed call to cuInit: ... (303)``, ``Could not find cuda
drivers``, the oneDNN and CPU-instruction notices), most of them from native code before
``TF_CPP_MIN_LOG_LEVEL`` is read. :func:`quiet_tensorflow` imports TensorFlow and lists
its devices with the process' standard error captured, drops the lines known to be
harmless on such a machine and passes every other line through unchanged.

Nothing is hidden where an NVIDIA driver is installed (GPU diagnostics matter there), or
when ``BTMTL_TF_VERBOSE=1``.
"""
from __future__ import annotations

import ctypes.util
import os
import re
import sys
import tempfile

#: startup lines of a CPU-only machine that say nothing the user can act on
BENIGN = tuple(re.compile(p) for p in (
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"oneDNN custom operations are on",
    r"Could not find cuda drivers on your machine",
    r"cpu_feature_guard\.cc",
    r"^To enable the following instructions: .*rebuild TensorFlow",
    r"failed call to cuInit",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"computation placer already registered",
    r"TF-TRT Warning: Could not find TensorRT",
))


def process_started() -> float:
    """``time.monotonic()`` at the moment this process started (Linux: from /proc; else now)."""
    import time

    try:
        with open("/proc/self/stat") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.monotonic() - max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic()


def nvidia_driver_present() -> bool:
    """An NVIDIA kernel driver or ``libcuda`` is installed (a GPU may be usable)."""
    return os.path.exists("/proc/driver/nvidia/version") or ctypes.util.find_library("cuda") is not None


def filter_startup_lines(text: str) -> str:
    """``text`` without the lines matched by :data:`BENIGN`."""
    kept = [line for line in text.splitlines() if line.strip() and not any(p.search(line) for p in BENIGN)]
    return "".join(line + "\n" for line in kept)


def quiet_tensorflow() -> None:
    """Import TensorFlow and initialise its devices, hiding the harmless CPU-only noise.

    Idempotent; a no-op (plain import) where a GPU driver exists or ``BTMTL_TF_VERBOSE=1``.
    """
    if "tensorflow" in sys.modules:
        return
    if os.environ.get("BTMTL_TF_VERBOSE") == "1" or nvidia_driver_present():
        import tensorflow  # noqa: F401
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # INFO lines after absl starts
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # the CUDA probe (cuInit) happens here
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            rest = filter_startup_lines(tmp.read().decode("utf-8", errors="replace"))
            if rest:
                sys.stderr.write(rest)
                sys.stderr.flush()


#: grappler passes turned off when TensorFlow has no GPU: the layout optimizer rewrites
#: data layouts for GPUs, and constant folding re-evaluates thousands of small constants
#: of a training graph; on the 2-core CPU both cost seconds at the first step
#: (EfficientMTNet at 256 px: 7-9 s -> 4.5 s) and slowed the steps after it too
#: (benchmarks/bench_startup.py)
CPU_GRAPPLER_OFF = ("layout_optimizer", "constant_folding")


def tune_graph_optimizer() -> dict:
    """On a machine where TensorFlow sees no GPU, turn off :data:`CPU_GRAPPLER_OFF`.

    Returns the options set (``{}`` with a GPU or ``BTMTL_GRAPPLER=default``).
    """
    import tensorflow as tf

    if os.environ.get("BTMTL_GRAPPLER") == "default" or tf.config.list_physical_devices("GPU"):
        return {}
    options = {name: False for name in CPU_GRAPPLER_OFF}
    tf.config.optimizer.set_experimental_options(options)
    return options


def machine_info() -> dict:
    """What a benchmark records of the machine it ran on: CPU model, cores, the instruction
    sets that change timings (AVX2, AVX512-BF16 / AMX), platform, Python, load average, and
    TensorFlow / Keras versions and GPUs when TensorFlow is already imported (never imported here)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    except OSError:
        cpuinfo = ""
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    info = {"cpu": model.group(1).strip() if model else (platform.processor() or platform.machine()),
            "cores": os.cpu_count(), "avx2": " avx2" in cpuinfo,
            "avx512_bf16": "avx512_bf16" in cpuinfo or "amx_bf16" in cpuinfo,
            "platform": platform.platform(), "python": platform.python_version(),
            "loadavg": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        info["tensorflow"] = tf.__version__
        info["gpus"] = [d.name for d in tf.config.list_physical_devices("GPU")]
    keras = sys.modules.get("keras")
    if keras is not None:
        info["keras"] = keras.__version__
    return info


__all__ = ["process_started", "machine_info", "quiet_tensorflow", "filter_startup_lines", "nvidia_driver_present", "tune_graph_optimizer", "BENIGN",
           "CPU_GRAPPLER_OFF"]
