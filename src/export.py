"""`python -m src.export checkpoint=PATH format=savedmodel|tflite|onnx [output=DIR]`

Exports the inference model of a checkpoint and checks the export against Keras.
``checkpoint``: a training run folder, a phase folder, a ``checkpoints`` folder or a
``.keras`` file (:func:`src.runs.resolve_checkpoint`: the same rules in every command).

* The inference model: :meth:`MultiTaskModel.inference_model` (training-only auxiliary
  heads ``<target>_aux<k>`` dropped). A model trained under mixed precision is rebuilt
  under the ``float32`` policy with the same weights, so the exported graph computes and
  returns float32 (the rebuilt model is itself checked against the original).
* ``savedmodel``: ``model.export(..., format="tf_saved_model")`` -> ``<output>/saved_model``
  (endpoint ``serve`` and signature ``serving_default``: input ``image`` float32
  ``[B, H, W, 3]`` in ``[0, 1]``, outputs keyed by head).
* ``tflite``: the SavedModel converted by ``tf.lite.TFLiteConverter.from_saved_model``
  (float, built-in ops; TF select ops only when a model needs them, said in the report)
  -> ``<output>/model.tflite``.
* ``onnx``: through ``tf2onnx`` when it is installed (``pip install tf2onnx``; verified
  with ``onnxruntime`` when that is installed too) -> ``<output>/model.onnx``. tf2onnx is
  not a dependency of this project; without it the command stops with a message saying
  how to install it.

Verification: ``n_samples`` seeded random images go through Keras and through the
exported model; ``export_report.json`` records the maximum absolute difference per
output and whether every one is within ``tolerance``. Exit status 0 when it is, 1 when
not, 2 for errors (bad checkpoint, missing tf2onnx).
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger("src.export")

FORMATS = ("savedmodel", "tflite", "onnx")
DEFAULT_TOLERANCE = {"savedmodel": 1e-5, "tflite": 1e-3, "onnx": 1e-3}
ONNX_HINT = ("format=onnx needs tf2onnx, which is not installed (an optional extra of this project). "
             "Install it with `pip install -e .[onnx]` (tf2onnx + onnxruntime, which verifies the export), "
             "or export format=savedmodel / format=tflite.")


class ExportError(RuntimeError):
    """Export cannot be done (the message says why and what to do)."""


# ---------------------------------------------------------------------------------------
# float32 inference model
# ---------------------------------------------------------------------------------------
def _is_low_precision(layer) -> bool:
    pol = getattr(layer, "dtype_policy", None)
    if pol is None:
        return False
    return str(getattr(pol, "compute_dtype", "float32")) != "float32" or str(pol.name).startswith("mixed")


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers") and layer is not model:
            yield from _all_layers(layer)


def needs_float32_rebuild(model) -> bool:
    return any(_is_low_precision(layer) for layer in _all_layers(model))


def _float32_config(obj):
    """A serialized model config with every mixed / half dtype policy replaced by float32."""
    if isinstance(obj, dict):
        if obj.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and isinstance(obj.get("config"), dict):
            name = str(obj["config"].get("name", ""))
            if name.startswith("mixed") or name in ("float16", "bfloat16"):
                return {**obj, "config": {**obj["config"], "name": "float32"}}
            return obj
        return {k: _float32_config(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_float32_config(v) for v in obj]
    if isinstance(obj, str) and obj in ("mixed_float16", "mixed_bfloat16", "float16", "bfloat16"):
        return "float32"
    return obj


@contextlib.contextmanager
def _global_policy(name: str):
    import keras

    old = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(old)


def to_float32(model):
    """``model`` itself when it already computes in float32, else a float32 rebuild of
    it with the same weights."""
    import keras

    if not needs_float32_rebuild(model):
        return model
    config = _float32_config(keras.saving.serialize_keras_object(model))
    with _global_policy("float32"):
        rebuilt = keras.saving.deserialize_keras_object(config)
    rebuilt.set_weights([np.asarray(w) for w in model.get_weights()])
    if needs_float32_rebuild(rebuilt):
        bad = [layer.name for layer in _all_layers(rebuilt) if _is_low_precision(layer)]
        raise ExportError(f"could not rebuild the model in float32; still low precision: {bad[:10]}")
    return rebuilt


def inference_model(checkpoint):
    """``(inference model, its float32 version, info, loaded)`` of a checkpoint (anything
    :func:`src.inference.load_for_inference` takes)."""
    from .inference import load_for_inference

    loaded = load_for_inference(checkpoint)
    model = loaded.network
    rebuilt = needs_float32_rebuild(model)
    model32 = to_float32(model)
    info = {"checkpoint": str(loaded.checkpoint), "heads": loaded.heads or ["output"],
            "dropped_heads": loaded.dropped_heads, "rebuilt_float32": rebuilt}
    return model, model32, info, loaded


def verification_inputs(loaded, shape, n: int, seed: int, samples=None) -> tuple:
    """``(x, where from)``: ``n`` images to compare the exported model with Keras on.

    Real slices when there are any: the files ``samples`` names (a folder or an image),
    else the validation images of the run's own data (when its ``data.root`` is here),
    prepared as prediction prepares them; otherwise random ``[0, 1]`` inputs (said so).
    """
    from .inference import ImageReadError, frame_for, list_images, prepare, read_image

    x, used = [], []
    for path in list_images(samples) if samples else _run_images(loaded, 4 * int(n)):
        if len(x) == int(n):
            break
        try:
            image = read_image(path)
        except ImageReadError as e:  # a broken file among the samples is skipped, not fatal
            log.info("export: skipping %s (%s)", path, e)
            continue
        x.append(prepare(image, frame_for(*image.shape[:2], shape[:2], loaded.run.resize)))
        used.append(str(path))
    if x:
        return np.stack(x).astype(np.float32), used
    return np.random.default_rng(seed).random((int(n), *shape), dtype=np.float32), "random [0, 1] inputs"


def _run_images(loaded, n: int) -> list:
    """The first ``n`` validation images of the run's data (none when unavailable)."""
    cfg = loaded.run.config
    if cfg is None or cfg.get("data") is None:
        return []
    try:
        from .data.dataset import load_data

        bundle = load_data(cfg.data, cache_dir=cfg.get("paths", {}).get("cache_dir"))
        records = bundle.split("val") or bundle.records
        return [r.image for r in records[:n]]
    except Exception as e:  # noqa: BLE001 - the data may live on another machine: fall back to random inputs
        log.info("export: the run's data is not readable here (%s); verifying on random inputs", e)
        return []


# ---------------------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------------------
def _as_dict(out, names) -> dict:
    if isinstance(out, dict):
        return {k: np.asarray(v, np.float32) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return {n: np.asarray(v, np.float32) for n, v in zip(names, out)}
    return {names[0]: np.asarray(out, np.float32)}


def _keras_outputs(model, x) -> dict:
    names = list(model.output) if isinstance(model.output, dict) else ["output"]
    return _as_dict(model(x, training=False), names)


def export_savedmodel(model, path: Path) -> Path:
    path = Path(path)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    try:
        model.export(str(path), format="tf_saved_model", verbose=False)
    except Exception as e:  # noqa: BLE001 - name the step that failed
        raise ExportError(f"SavedModel export failed ({type(e).__name__}: {e})") from e
    return path


def run_savedmodel(path: Path, x: np.ndarray) -> dict:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    out = loaded.serve(tf.constant(x))
    return _as_dict(out, ["output"])


def export_tflite(saved_model: Path, path: Path) -> tuple:
    """(path, notes): float TFLite from a SavedModel; TF select ops only if needed."""
    import tensorflow as tf

    notes = []
    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    try:
        data = conv.convert()
    except Exception as e:  # noqa: BLE001 - retry with TF ops, say so
        log.warning("TFLite conversion with built-in ops failed (%s); retrying with TF select ops", e)
        conv = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
        data = conv.convert()
        notes.append("uses TF select ops (needs the Flex delegate at runtime)")
    Path(path).write_bytes(data)
    return Path(path), notes


def _tflite_interpreter(path: Path):
    try:
        from ai_edge_litert.interpreter import Interpreter  # the successor of tf.lite.Interpreter
    except ImportError:
        import warnings

        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tf.lite.Interpreter(model_path=str(path))
    return Interpreter(model_path=str(path))


def run_tflite(path: Path, x: np.ndarray) -> dict:
    it = _tflite_interpreter(path)
    sigs = it.get_signature_list()
    key = "serving_default" if "serving_default" in sigs else next(iter(sigs))
    runner = it.get_signature_runner(key)
    in_name = sigs[key]["inputs"][0]
    # one image at a time: the batch dimension of a TFLite signature is resized per call
    outs: dict = {}
    for i in range(len(x)):
        o = runner(**{in_name: x[i:i + 1]})
        for k, v in o.items():
            outs.setdefault(k, []).append(np.asarray(v, np.float32))
    return {k: np.concatenate(v, axis=0) for k, v in outs.items()}


def export_onnx(model, path: Path, opset: Optional[int] = None) -> Path:
    try:
        import tf2onnx
    except ImportError as e:
        raise ExportError(ONNX_HINT) from e
    import tensorflow as tf

    shape = [None, *model.inputs[0].shape[1:]]
    spec = (tf.TensorSpec(shape, tf.float32, name="image"),)

    @tf.function(input_signature=spec)
    def serve(image):
        return model(image, training=False)

    try:
        tf2onnx.convert.from_function(serve, input_signature=spec, opset=opset, output_path=str(path))
    except Exception as e:  # noqa: BLE001 - tf2onnx fails in many ways; say it plainly
        raise ExportError(f"tf2onnx could not convert this model ({type(e).__name__}: {e}); "
                          "use format=savedmodel or format=tflite") from e
    return Path(path)


def run_onnx(path: Path, x: np.ndarray, names: Sequence[str]) -> Optional[dict]:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0].name
    outs = sess.run(None, {inp: x})
    onames = [o.name for o in sess.get_outputs()]
    result = {}
    for n, v in zip(onames, outs):
        key = next((h for h in names if n == h or n.endswith(h) or h in n), n)
        result[key] = np.asarray(v, np.float32)
    return result


# ---------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------
def compare(reference: dict, got: dict) -> dict:
    """``{head: max abs difference}`` (``inf`` for a missing head or a shape mismatch)."""
    diffs = {}
    for k, ref in reference.items():
        v = got.get(k)
        if v is None or np.shape(v) != np.shape(ref):
            diffs[k] = float("inf")
        elif ref.size == 0:
            diffs[k] = 0.0
        else:
            diffs[k] = float(np.max(np.abs(np.asarray(v, np.float64) - np.asarray(ref, np.float64))))
    return diffs


def default_output(checkpoint, fmt: str) -> Path:
    """``<run folder>/export/<format>`` (beside the checkpoint file outside a run)."""
    from .runs import find_run_dir, resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    base = find_run_dir(ckpt) or ckpt.parent
    return base / "export" / fmt


def export(checkpoint, fmt: str = "savedmodel", output=None, n_samples: int = 4, tolerance: Optional[float] = None,
           seed: int = 0, opset: Optional[int] = None, samples=None) -> dict:
    """Export and verify; returns the report (also written to ``export_report.json``)."""
    import keras
    import tensorflow as tf

    fmt = str(fmt).lower()
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "onnx":
        try:
            import tf2onnx  # noqa: F401
        except ImportError as e:
            raise ExportError(ONNX_HINT) from e
    out = Path(output) if output else default_output(checkpoint, fmt)
    out.mkdir(parents=True, exist_ok=True)
    original, model, info, loaded = inference_model(checkpoint)
    tol = float(tolerance if tolerance is not None else DEFAULT_TOLERANCE[fmt])
    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    x, inputs_from = verification_inputs(loaded, shape, n_samples, seed, samples)
    reference = _keras_outputs(model, x)
    report = {"format": fmt, **info, "output": None, "input": {"name": model.inputs[0].name, "shape": [None, *shape],
                                                               "dtype": "float32", "range": "[0, 1]"},
              "outputs": {k: {"shape": [None, *v.shape[1:]], "dtype": str(v.dtype)} for k, v in reference.items()},
              "n_samples": int(len(x)), "verified_on": inputs_from, "seed": int(seed), "tolerance": tol, "notes": [],
              "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
              "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    if info["rebuilt_float32"]:
        # the rebuilt float32 model against the mixed-precision original (half-precision rounding)
        low = _keras_outputs(original, x)
        report["float32_rebuild_max_abs_diff"] = compare(reference, low)
    non32 = [k for k, v in reference.items() if v.dtype != np.float32]
    if non32:
        raise ExportError(f"outputs {non32} are not float32")

    if fmt in ("savedmodel", "tflite"):
        sm = export_savedmodel(model, out / "saved_model")
        if fmt == "savedmodel":
            report["output"] = str(sm)
            got = run_savedmodel(sm, x)
        else:
            path, notes = export_tflite(sm, out / "model.tflite")
            report["notes"] += notes
            report["saved_model"] = str(sm)
            report["output"] = str(path)
            got = run_tflite(path, x)
    else:
        path = export_onnx(model, out / "model.onnx", opset=opset)
        report["output"] = str(path)
        got = run_onnx(path, x, list(reference))
        if got is None:
            report["notes"].append("not verified: onnxruntime is not installed (pip install onnxruntime)")
    if got is not None:
        diffs = compare(reference, got)
        report["max_abs_diff"] = diffs
        report["passed"] = bool(all(d <= tol for d in diffs.values()))
    else:
        report["max_abs_diff"] = None
        report["passed"] = None
    (out / "export_report.json").write_text(json.dumps(report, indent=2))
    report["report"] = str(out / "export_report.json")
    return report


def run(cfg) -> dict:
    return export(cfg.checkpoint, cfg.get("format", "savedmodel"), output=cfg.get("output"),
                  n_samples=int(cfg.get("n_samples", 4)), tolerance=cfg.get("tolerance"), seed=int(cfg.get("seed", 0)),
                  opset=cfg.get("opset"), samples=cfg.get("samples"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import cli_main
    from .runs import CHECKPOINT_REQUIRED

    def status(report: dict) -> int:
        if report.get("passed") is False:
            print(f"error: the exported model differs from Keras by more than {report['tolerance']:g}: "
                  f"{report['max_abs_diff']}", file=sys.stderr)
            return 1
        return 0

    return cli_main(__doc__, "export", lambda cfg, args: run(cfg), argv, errors=(ExportError,),
                    required=[("checkpoint", CHECKPOINT_REQUIRED)], exit_code=status)


if __name__ == "__main__":
    sys.exit(main())
