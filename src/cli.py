"""The shared shell of every ``python -m src.<command>`` entry point (except ``src.train``,
which is a Hydra app with its own run folder).

:func:`cli_main` composes the command's config (``conf/<name>.yaml`` + the command-line
overrides), runs it and prints its JSON summary. Bad input becomes one ``error: ...`` line
and exit status 2 instead of a stack trace (``BTMTL_DEBUG=1`` re-raises), ``-h``/``--help``
prints the command's docstring. A ``checkpoint=`` that names nothing usable
(:class:`src.runs.CheckpointError`) and a model or setting inference cannot use
(:class:`src.inference.InferenceError`) are such errors in every command.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Callable, Iterable, Optional, Sequence


class UsageError(ValueError):
    """A required setting is missing or a setting is wrong (exit status 2)."""


def _weights_errors() -> tuple:
    w = sys.modules.get("src.models.weights")  # imported only with the backbones, when one was built
    return (w.WeightsUnavailableError, w.WeightsMismatchError) if w is not None else ()


def cli_main(doc: str, config_name: str, run: Callable[[Any, list], dict], argv: Optional[Sequence[str]] = None,
             errors: Iterable[type] = (), required: Sequence[tuple] = (),
             exit_code: Optional[Callable[[dict], int]] = None) -> int:
    """Compose ``config_name`` with ``argv`` (default ``sys.argv[1:]``), call
    ``run(cfg, args)``, print its result as JSON.

    ``errors``: exception types (besides config, data and missing-file errors) reported as
    ``error: <message>`` with exit status 2. ``required``: ``(key, message)`` pairs that
    must be set. ``exit_code(result)``: the status after a run (default 0).
    """
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    from .config import compose
    from .data.records import DataError
    from .inference import InferenceError
    from .runs import CheckpointError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(doc)
        return 0
    from .runtime import quiet_tensorflow

    quiet_tensorflow()  # no CUDA-probe noise on a CPU-only machine
    handled = (UsageError, DataError, FileNotFoundError, CheckpointError, InferenceError, HydraException,
               OmegaConfBaseException, *errors)
    try:
        try:
            cfg = compose(args, config_name=config_name)
            for key, message in required:
                if OmegaConf.is_missing(cfg, key) or not cfg.get(key):
                    raise UsageError(message)
        except MissingMandatoryValue as e:
            raise UsageError(next((m for k, m in required if k in str(e)), str(e))) from e
        result = run(cfg, args)
    except Exception as e:  # noqa: BLE001 - sorted below: ours become one line, the rest re-raise
        if not isinstance(e, handled + _weights_errors()) or os.environ.get("BTMTL_DEBUG"):
            raise
        logging.getLogger(__name__).debug("traceback", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return int(exit_code(result)) if exit_code else 0
