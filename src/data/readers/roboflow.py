"""``roboflow`` reader: download a Roboflow project version, then read it.

Options (``data.options``)::

    workspace: my-workspace     Roboflow workspace id      } needed only when the
    project:   brain-tumor-xyz  Roboflow project id        } export is not in
    version:   3                dataset version number     } data.root yet
    format:    coco             export format; picks the reader that reads it:
                                  coco (also coco-segmentation)     -> ``coco``
                                  yolov5 / yolov8 / yolov11 / ...   -> ``yolo``
                                  tensorflow                        -> ``roboflow_csv``
    timeout:   3                seconds for the reachability check of the API host
    (anything else is passed on to that reader, e.g. ``unannotated: negative``)

Accepted layout: whatever the chosen reader accepts. Roboflow exports unzip to::

    coco:        <root>/<split>/_annotations.coco.json + images
    yolo*:       <root>/data.yaml, <root>/<split>/images/, <root>/<split>/labels/
    tensorflow:  <root>/<split>/_annotations.csv + images

Flow: when ``data.root`` already holds the export (its annotation files, above), nothing
is downloaded and no key is needed. Otherwise the ``roboflow`` package downloads
``workspace/project/version`` in ``format`` into a temporary folder beside ``root`` that
is renamed into place once complete (a killed download never looks like a dataset).

The API key comes from the environment variable ``ROBOFLOW_API_KEY``, else from a
``.env`` file (python-dotenv) in the current folder or the repository root; never from
the config (an ``api_key`` option is refused). The key is never logged, printed,
stored on the reader, put in records or left in an error message: every message and
every log line or print made during the download (including urllib3's request logs,
which carry ``?api_key=...`` URLs) has the key replaced by ``***``.

Offline, the reader fails fast: before calling the package (which retries its key check
five times), it opens a TCP connection to the API host (``API_URL`` from the environment,
as the package uses, default ``https://api.roboflow.com``; name resolution included) within
``timeout`` seconds, then validates the key with one bounded request (a refused key, or a
proxy/captive portal answering instead of Roboflow, fails at once). Every failure says how
to read a local copy instead (``data=coco data.root=/path/to/export``).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from ..base import Reader, get_reader, register_reader
from ..records import DataError, Record

log = logging.getLogger(__name__)

KEY_ENV = "ROBOFLOW_API_KEY"
REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_API_URL = "https://api.roboflow.com"

#: export format -> (format id sent to Roboflow, reader that reads it, how to detect it on disk)
FORMATS: dict[str, tuple[str, str]] = {
    "coco": ("coco", "coco"),
    "coco-segmentation": ("coco-segmentation", "coco"),
    "yolov5": ("yolov5pytorch", "yolo"),
    "yolov5pytorch": ("yolov5pytorch", "yolo"),
    "yolov7": ("yolov7pytorch", "yolo"),
    "yolov7pytorch": ("yolov7pytorch", "yolo"),
    "yolov8": ("yolov8", "yolo"),
    "yolov9": ("yolov9", "yolo"),
    "yolov11": ("yolov11", "yolo"),
    "yolov12": ("yolov12", "yolo"),
    "tensorflow": ("tensorflow", "roboflow_csv"),
}
OWN_OPTIONS = ("workspace", "project", "version", "format", "timeout")
SECRET_OPTIONS = ("api_key", "key", "roboflow_api_key")


# ---- the key -------------------------------------------------------------------------------
def find_api_key() -> Optional[str]:
    """``ROBOFLOW_API_KEY`` from the environment, else from ``./.env`` or ``<repo>/.env``."""
    key = os.environ.get(KEY_ENV, "").strip()
    if key:
        return key
    from dotenv import dotenv_values

    seen = set()
    for folder in (Path.cwd(), REPO_ROOT):
        env = (folder / ".env").resolve()
        if env in seen or not env.is_file():
            continue
        seen.add(env)
        value = (dotenv_values(env).get(KEY_ENV) or "").strip()
        if value:
            return value
    return None


def redact(text: str, secret: Optional[str]) -> str:
    """``text`` with every occurrence of ``secret`` replaced by ``***``."""
    text = str(text)
    if secret:
        text = text.replace(secret, "***")
    return text


class _RedactFilter(logging.Filter):
    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a broken format string: leave the record alone
            return True
        if self.secret in msg:
            record.msg, record.args = redact(msg, self.secret), ()
        if record.exc_info and record.exc_info[1] is not None and self.secret in str(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


class _RedactStream(io.TextIOBase):
    """A text stream that forwards to ``target`` with the secret redacted."""

    def __init__(self, target, secret: str):
        self.target, self.secret = target, secret

    def write(self, s):
        self.target.write(redact(s, self.secret))
        return len(s)

    def flush(self):
        self.target.flush()

    def isatty(self):
        return bool(getattr(self.target, "isatty", lambda: False)())


@contextlib.contextmanager
def redacted_output(secret: str):
    """While active, logs (urllib3, requests, roboflow, root handlers) and stdout/stderr
    have ``secret`` replaced by ``***``."""
    flt = _RedactFilter(secret)
    names = ["", "urllib3", "requests", "roboflow", __name__]
    names += [n for n in list(logging.root.manager.loggerDict)
              if n.split(".")[0] in ("urllib3", "requests", "roboflow", "charset_normalizer")]
    loggers = [logging.getLogger(n) for n in dict.fromkeys(names)]
    handlers = list({id(h): h for lg in loggers for h in lg.handlers}.values())
    targets = loggers + handlers
    for t in targets:
        t.addFilter(flt)
    try:
        with contextlib.redirect_stdout(_RedactStream(sys.stdout, secret)), \
                contextlib.redirect_stderr(_RedactStream(sys.stderr, secret)):
            yield
    finally:
        for t in targets:
            t.removeFilter(flt)


# ---- the network ---------------------------------------------------------------------------
def api_url() -> str:
    """The API base URL the ``roboflow`` package will use (refreshed from ``API_URL``)."""
    try:
        import roboflow.config as rcfg
    except ImportError:  # pragma: no cover - roboflow is a dependency
        return os.environ.get("API_URL", DEFAULT_API_URL)
    # the package binds its URLs at import; re-resolve so API_URL set later is honoured
    rcfg.refresh_region_urls()
    return str(rcfg.API_URL)


def check_reachable(url: str, timeout: float = 3.0) -> Optional[str]:
    """None when a TCP connection to ``url``'s host opens within ``timeout`` s, else why not.

    Name resolution runs inside the same deadline (a thread), so a machine without DNS
    fails as fast as one without a route.
    """
    u = urlparse(url)
    host = u.hostname or ""
    port = u.port or (443 if u.scheme == "https" else 80)
    result: list = []

    def connect():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(None)
        except OSError as e:
            result.append(f"{e.__class__.__name__}: {e}")

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    if not result:
        return f"no answer within {timeout:g} s"
    return result[0]


# ---- the reader ----------------------------------------------------------------------------
@register_reader("roboflow")
class RoboflowReader(Reader):
    """Downloads a Roboflow export into ``data.root`` when it is not there, then reads it
    with the reader of its format (``self.inner``)."""

    def __init__(self, root, class_map=None, on_error: str = "raise", **options):
        secret = sorted(k for k in options if str(k).lower() in SECRET_OPTIONS)
        if secret:
            raise DataError(
                f"reader 'roboflow': option(s) {secret} refused: the Roboflow API key is never taken from "
                f"the config (it would end up in logs, Hydra outputs and MLflow params). Set {KEY_ENV} in "
                "the environment or in a .env file instead.")
        super().__init__(root, class_map=class_map, on_error=on_error, **options)
        fmt = str(options.get("format") or "coco").strip().lower()
        if fmt not in FORMATS:
            raise DataError(f"reader 'roboflow': unknown format {fmt!r}; supported: {sorted(FORMATS)} "
                            "(coco -> coco reader, yolo* -> yolo reader, tensorflow -> roboflow_csv reader)")
        self.format = fmt
        self.format_id, self.reader_name = FORMATS[fmt]
        self.workspace = options.get("workspace")
        self.project = options.get("project")
        self.version = options.get("version")
        try:
            self.timeout = float(options.get("timeout", 3.0))
        except (TypeError, ValueError):
            raise DataError(f"reader 'roboflow': timeout must be a number of seconds, "
                            f"got {options.get('timeout')!r}") from None
        self.inner_options = {k: v for k, v in options.items() if k not in OWN_OPTIONS}
        self.inner: Optional[Reader] = None
        self.downloaded = False

    def __repr__(self) -> str:
        return (f"RoboflowReader(root={str(self.root)!r}, workspace={self.workspace!r}, "
                f"project={self.project!r}, version={self.version!r}, format={self.format!r})")

    @property
    def slug(self) -> str:
        return f"{self.workspace}/{self.project}/{self.version}"

    # ---- presence -----------------------------------------------------------------------
    def present(self, folder: Optional[Path] = None) -> bool:
        """True when ``folder`` (default ``root``) holds an export of this format."""
        folder = Path(folder or self.root)
        if not folder.is_dir():
            return False
        if self.reader_name == "yolo":
            return (folder / "data.yaml").is_file() or (folder / "data.yml").is_file()
        name = "_annotations.coco.json" if self.reader_name == "coco" else "_annotations.csv"
        if (folder / name).is_file():
            return True
        return any((d / name).is_file() for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))

    def _local_hint(self) -> str:
        return (f"To use a local copy instead, export the version from app.roboflow.com ('{self.format}' "
                f"format), unzip it and point data.root at it with the {self.reader_name} reader: "
                f"data={self.reader_name} data.root=/path/to/export (coco, yolo and roboflow_csv read "
                "Roboflow's COCO, YOLO and TensorFlow-CSV exports).")

    # ---- download -----------------------------------------------------------------------
    def download(self) -> Path:
        """Download the export into ``root`` (which must not hold it yet)."""
        missing = [k for k in ("workspace", "project", "version") if self.options.get(k) in (None, "", "???")]
        if missing:
            raise DataError(
                f"{self.root}: no Roboflow '{self.format}' export there and data.options {missing} not set, so "
                f"nothing can be downloaded. Set data.options.workspace/project/version. {self._local_hint()}")
        try:
            version = int(str(self.version))
        except ValueError:
            raise DataError(f"reader 'roboflow': version must be a number, got {self.version!r}") from None
        key = find_api_key()
        if not key:
            raise DataError(
                f"cannot download Roboflow dataset {self.slug}: no API key. Set {KEY_ENV} in the environment "
                f"(export {KEY_ENV}=...) or in a .env file in the current folder or the repository root "
                f"({REPO_ROOT / '.env'}). Or, with a local copy of the export, read it directly: "
                f"data={self.reader_name} data.root=/local/copy (e.g. data=coco data.root=/local/copy).")
        url = api_url()
        why = check_reachable(url, self.timeout)
        if why is not None:
            raise DataError(redact(
                f"cannot download Roboflow dataset {self.slug}: the Roboflow API at {url} is not reachable "
                f"({why}); offline or behind a firewall? {self._local_hint()}", key))

        with redacted_output(key):
            why = self._preflight(url, key)
        if why is not None:
            raise DataError(redact(f"cannot download Roboflow dataset {self.slug}: {why}", key))

        parent = self.root.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.root.name}.download-", dir=parent))
        except OSError as e:
            raise DataError(f"cannot download into {self.root}: {parent} is not writable ({e}); "
                            "set data.root to a writable folder") from None
        error: Optional[str] = None
        log.info("downloading Roboflow dataset %s (%s) into %s", self.slug, self.format, self.root)
        try:
            with redacted_output(key):
                import roboflow

                try:
                    rf = roboflow.Roboflow(api_key=key)
                    ver = rf.workspace(str(self.workspace)).project(str(self.project)).version(version)
                    ver.download(self.format_id, location=str(tmp), overwrite=True)
                except Exception as e:  # the package raises RuntimeError, RoboflowError, requests errors ...
                    error = f"{e.__class__.__name__}: {e}"
            if error is None and not self.present(tmp):
                found = sorted(p.name for p in tmp.iterdir())
                error = f"the downloaded archive holds no '{self.format}' export ({found})"
            if error is None:
                self._move_into_place(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            # raised outside the except block: no chained exception (whose text may hold the
            # key in a request URL) rides along
            raise DataError(redact(
                f"Roboflow download of {self.slug} ('{self.format}') into {self.root} failed: {error}. "
                f"Check {KEY_ENV}, the workspace/project/version ids and that the version exists. "
                f"{self._local_hint()}", key))
        self.downloaded = True
        log.info("downloaded Roboflow dataset %s into %s", self.slug, self.root)
        return self.root

    def _preflight(self, url: str, key: str) -> Optional[str]:
        """Validate the key with one bounded request (the package's own check retries 5 times
        on any non-200 answer, e.g. from a proxy or captive portal). None when all is well."""
        import requests

        try:
            resp = requests.post(url.rstrip("/") + "/?api_key=" + key, timeout=(self.timeout, 3 * self.timeout + 10))
        except requests.RequestException as e:
            return (f"the Roboflow API at {url} is not reachable ({e.__class__.__name__}: {e}); offline or behind "
                    f"a firewall? {self._local_hint()}")
        if resp.status_code in (401, 403):
            return (f"Roboflow refused the API key (HTTP {resp.status_code}: {resp.text[:300]}). Check {KEY_ENV} "
                    "(environment or .env).")
        try:
            ok = resp.status_code == 200 and isinstance(resp.json(), dict)
        except ValueError:
            ok = False
        if not ok:
            return (f"the Roboflow API at {url} is not reachable: it answered HTTP {resp.status_code} "
                    f"{resp.text[:200]!r}, not a Roboflow reply (a proxy or captive portal?). {self._local_hint()}")
        return None

    def _move_into_place(self, tmp: Path) -> None:
        if not self.root.exists():
            os.replace(tmp, self.root)
            return
        for p in tmp.iterdir():
            dest = self.root / p.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            elif dest.exists() or dest.is_symlink():
                dest.unlink()
            os.replace(p, dest)

    # ---- read ---------------------------------------------------------------------------
    def make_inner(self) -> Reader:
        opts = dict(self.inner_options)
        opts.setdefault("source", f"roboflow:{self.project}" if self.project else "roboflow")
        return get_reader(self.reader_name)(self.root, class_map=self.class_map, on_error=self.on_error, **opts)

    def read(self) -> list[Record]:
        if not self.present():
            self.download()
        else:
            log.info("Roboflow export found in %s: not downloading", self.root)
        self.inner = self.make_inner()
        try:
            records = self.inner.read()
        finally:
            self.skipped = self.inner.skipped
        for r in records:
            if self.workspace and self.project and self.version is not None:
                r.meta.setdefault("roboflow", self.slug)
        return records

    def read_records(self) -> list[Record]:
        return self.make_inner().read_records()
