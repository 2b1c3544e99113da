"""A CPU-only start is quiet: TensorFlow's CUDA-probe lines are dropped, anything else is kept."""
import subprocess
import sys
from pathlib import Path

import pytest

from src.runtime import filter_startup_lines, nvidia_driver_present

ROOT = Path(__file__).resolve().parents[1]


def test_filter_keeps_what_is_not_known_noise():
    text = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            "I0000 00:00:1 port.cc:153] oneDNN custom operations are on. You may see ...\n"
            "E0000 00:00:1 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: (303)\n"
            "UserWarning: something the user should see\n"
            "E0000 00:00:1 some_op.cc:1] a real error\n")
    assert filter_startup_lines(text) == ("UserWarning: something the user should see\n"
                                          "E0000 00:00:1 some_op.cc:1] a real error\n")


@pytest.mark.skipif(nvidia_driver_present(), reason="an NVIDIA driver is installed: nothing is hidden there")
def test_cpu_only_start_prints_no_cuda_probe_lines():
    code = ("from src.runtime import quiet_tensorflow; quiet_tensorflow()\n"
            "import sys, tensorflow as tf; print(len(tf.config.list_physical_devices('CPU')))\n"
            "print('after', file=sys.stderr)")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
    assert out.stderr.strip() == "after", out.stderr        # stderr works again afterwards
    loud = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**env, "BTMTL_TF_VERBOSE": "1"}, timeout=120)
    assert "cuInit" in loud.stderr or "cuda" in loud.stderr.lower()  # what the quiet start hides


def test_machine_info_names_the_cpu_without_importing_tensorflow():
    code = ("import sys, json; from src.runtime import machine_info; m = machine_info()\n"
            "print(json.dumps({'m': m, 'tf': 'tensorflow' in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    import json

    got = json.loads(out.stdout)
    assert got["tf"] is False  # a benchmark's bookkeeping never pays TensorFlow's start-up
    m = got["m"]
    assert isinstance(m["cpu"], str) and m["cpu"]
    assert m["cores"] >= 1 and isinstance(m["avx2"], bool) and isinstance(m["avx512_bf16"], bool)
    assert "tensorflow" not in m and "gpus" not in m  # only recorded when TensorFlow is already loaded
