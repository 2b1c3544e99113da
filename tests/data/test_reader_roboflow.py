"""roboflow reader: the real ``roboflow`` package downloads from a local fake API server.

The package takes its API base URL from the environment variable ``API_URL``
(``roboflow/config.py``); the reader re-resolves it before each download, so pointing
``API_URL`` at a ``http.server`` on 127.0.0.1 runs the package's real request flow
(key check, workspace, project/versions, version status, export link, zip download,
unzip) without the internet. The server serves a zip of a tiny COCO export built here.
"""
from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import cv2
import numpy as np
import pytest

from src.data.base import get_reader
from src.data.readers import roboflow as rfr
from src.data.records import DataError

KEY = "rf_tEstKey9SECRETxyz"  # has lowercase letters: the package validates it with the server
WS, PROJECT, VERSION = "brain-ws", "tumours", 2


# --------------------------------------------------------------------------------------
# a tiny Roboflow-style COCO export, as a zip
# --------------------------------------------------------------------------------------
def _jpg(seed: int, size: int = 64) -> bytes:
    img = np.full((size, size), 30 + seed, np.uint8)
    img[10:30, 20:44] = 220
    ok, buf = cv2.imencode(".jpg", img)
    return buf.tobytes()


def coco_export_zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("README.roboflow.txt", "exported by a fake roboflow\n")
        for split, n in (("train", 2), ("valid", 1)):
            images, anns = [], []
            for i in range(n):
                name = f"{split}{i}_jpg.rf.abc{i}.jpg"
                z.writestr(f"{split}/{name}", _jpg(i))
                images.append({"id": i, "file_name": name, "width": 64, "height": 64})
                anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [20, 10, 24, 20], "area": 480,
                             "segmentation": [[20, 10, 44, 10, 44, 30, 20, 30]], "iscrowd": 0})
            z.writestr(f"{split}/_annotations.coco.json", json.dumps({
                "info": {"description": "Exported from roboflow.ai"},
                "categories": [{"id": 0, "name": "tumours", "supercategory": "none"},
                               {"id": 1, "name": "Tumor", "supercategory": "tumours"}],
                "images": images, "annotations": anns}))
    return out.getvalue()


# --------------------------------------------------------------------------------------
# the fake API
# --------------------------------------------------------------------------------------
class FakeRoboflow:
    """Answers the requests roboflow 1.x makes for ``Roboflow().workspace().project().version().download()``."""

    def __init__(self, zip_bytes: bytes, fmt: str = "coco"):
        self.zip_bytes, self.fmt = zip_bytes, fmt
        self.requests: list[str] = []
        self.broken_project = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep the test output quiet
                pass

            def _send(self, code, payload, ctype="application/json"):
                body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                fake.requests.append("POST " + self.path)
                u = urlparse(self.path)
                if parse_qs(u.query).get("api_key") != [KEY]:
                    return self._send(401, {"error": "bad key"})
                return self._send(200, {"workspace": WS})

            def do_GET(self):
                fake.requests.append("GET " + self.path)
                u = urlparse(self.path)
                parts = [p for p in u.path.split("/") if p]
                if parts[:1] == ["download"]:
                    return self._send(200, fake.zip_bytes, "application/zip")
                if parse_qs(u.query).get("api_key") != [KEY]:
                    return self._send(401, {"error": "bad key"})
                base = f"http://127.0.0.1:{fake.port}"
                if parts == [WS]:
                    return self._send(200, {"workspace": {"name": WS, "url": WS, "projects": []}})
                if parts == [WS, PROJECT]:
                    if fake.broken_project:  # an error page that echoes the request, key included
                        return self._send(404, {"error": f"no such project at {self.path}"})
                    return self._send(200, {
                        "project": {"annotation": "tumor", "classes": {"Tumor": 3}, "colors": {},
                                    "created": 1700000000, "id": f"{WS}/{PROJECT}", "images": 3,
                                    "name": PROJECT, "public": False, "splits": {"train": 2, "valid": 1},
                                    "type": "object-detection", "unannotated": 0, "updated": 1700000000},
                        "versions": [{"id": f"{WS}/{PROJECT}/{VERSION}", "augmentation": {}, "created": 1700000000,
                                      "images": 3, "preprocessing": {}, "splits": {"train": 2, "valid": 1},
                                      "exports": [fake.fmt]}]})
                if parts == [WS, PROJECT, str(VERSION)]:
                    return self._send(200, {"version": {"id": f"{WS}/{PROJECT}/{VERSION}", "images": 3,
                                                        "generating": False, "progress": 1.0}})
                if parts == [WS, PROJECT, str(VERSION), fake.fmt]:
                    return self._send(200, {"export": {"link": f"{base}/download/export.zip", "format": fake.fmt}})
                return self._send(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _restore_api_url(old):
    import os

    import roboflow.config

    if old is None:
        os.environ.pop("API_URL", None)
    else:
        os.environ["API_URL"] = old
    roboflow.config.refresh_region_urls()


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No key anywhere (environment, ./.env, repo .env) unless a test sets one."""
    monkeypatch.delenv(rfr.KEY_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rfr, "REPO_ROOT", tmp_path / "repo")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)  # the fake server is local
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return monkeypatch


@pytest.fixture
def api(env):
    """A fake Roboflow API on 127.0.0.1, with ``API_URL`` pointing at it."""
    import os

    old = os.environ.get("API_URL")
    with FakeRoboflow(coco_export_zip()) as fake:
        os.environ["API_URL"] = fake.url
        try:
            yield fake
        finally:
            _restore_api_url(old)


def reader(root, **opts):
    opts = {"workspace": WS, "project": PROJECT, "version": VERSION, "format": "coco", **opts}
    return get_reader("roboflow")(root, class_map=None, **opts)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --------------------------------------------------------------------------------------
# end to end: download -> unzip -> coco reader
# --------------------------------------------------------------------------------------
def test_download_then_read_coco(api, env, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)  # urllib3 logs every request URL (with ?api_key=) at DEBUG
    env.setenv(rfr.KEY_ENV, KEY)
    root = tmp_path / "data" / "roboflow" / "tumours-v2"
    r = reader(root)
    recs = r.read()
    assert r.downloaded and r.inner.name == "coco"
    assert (root / "train" / "_annotations.coco.json").is_file() and (root / "valid").is_dir()
    assert not (root / "roboflow.zip").exists()
    assert not [p for p in root.parent.iterdir() if ".download-" in p.name]  # temp folder gone
    assert len(recs) == 3
    assert sorted(r_.split for r_ in recs) == ["train", "train", "val"]
    for rec in recs:
        assert rec.label == "tumor" and rec.box_classes == ("tumor",)
        np.testing.assert_allclose(rec.boxes, [[20 / 64, 10 / 64, 44 / 64, 30 / 64]], atol=1e-6)
        assert rec.meta["roboflow"] == f"{WS}/{PROJECT}/{VERSION}"
    # the package's real request flow ran against the fake server
    # (roboflow 1.7: POST / twice (our bounded key check, then the package's), workspace,
    # project twice, version status, export link, zip)
    paths = iter(q.split("?")[0] for q in api.requests)
    for step in ["POST /", f"GET /{WS}", f"GET /{WS}/{PROJECT}", f"GET /{WS}/{PROJECT}/{VERSION}/coco",
                 "GET /download/export.zip"]:
        assert step in paths, (step, api.requests)  # in this order
    # the key went to the server but nowhere else
    out = capsys.readouterr()
    assert any("api_key=" in q for q in api.requests)
    assert "127.0.0.1" in caplog.text  # urllib3's request logs were captured ...
    assert KEY not in caplog.text      # ... with the key redacted
    assert KEY not in out.out + out.err
    assert KEY not in repr(r) and KEY not in str(r.options) and KEY not in str(vars(r))
    assert all(KEY not in json.dumps(x.to_json()) for x in recs)

    # second read: the export is there, nothing is downloaded, no key needed
    env.delenv(rfr.KEY_ENV)
    n = len(api.requests)
    r2 = reader(root)
    assert len(r2.read()) == 3 and not r2.downloaded
    assert len(api.requests) == n


def test_key_from_dotenv_in_current_folder(api, env, tmp_path):
    (tmp_path / ".env").write_text(f"OTHER=1\n{rfr.KEY_ENV}={KEY}\n")
    assert rfr.find_api_key() == KEY
    assert len(reader(tmp_path / "dl").read()) == 3


def test_key_from_dotenv_in_repo_root(env, tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / ".env").write_text(f'{rfr.KEY_ENV}="{KEY}"\n')
    assert rfr.find_api_key() == KEY
    env.setenv(rfr.KEY_ENV, "from-env-wins")
    assert rfr.find_api_key() == "from-env-wins"


def test_existing_empty_root_is_filled(api, env, tmp_path):
    env.setenv(rfr.KEY_ENV, KEY)
    root = tmp_path / "dl"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    assert len(reader(root).read()) == 3
    assert (root / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------------------
# failures
# --------------------------------------------------------------------------------------
def test_missing_key_message(env, tmp_path):
    with pytest.raises(DataError) as e:
        reader(tmp_path / "dl").read()
    msg = str(e.value)
    assert rfr.KEY_ENV in msg and ".env" in msg
    assert "data=coco data.root=/local/copy" in msg
    assert not (tmp_path / "dl").exists()


def test_offline_fails_fast_with_local_copy_hint(env, tmp_path, caplog):
    import os

    env.setenv(rfr.KEY_ENV, KEY)
    old = os.environ.get("API_URL")
    os.environ["API_URL"] = f"http://127.0.0.1:{_closed_port()}"
    try:
        t = time.monotonic()
        with pytest.raises(DataError) as e:
            reader(tmp_path / "dl").read()
        elapsed = time.monotonic() - t
    finally:
        _restore_api_url(old)
    msg = str(e.value)
    assert elapsed < 3.5
    assert "not reachable" in msg and "data.root" in msg and "data=coco" in msg
    assert KEY not in msg and KEY not in caplog.text
    assert not (tmp_path / "dl").exists()


def test_unroutable_host_times_out_quickly(env, tmp_path):
    import os

    env.setenv(rfr.KEY_ENV, KEY)
    old = os.environ.get("API_URL")
    os.environ["API_URL"] = "http://10.255.255.1:9"  # blackholed or unreachable: either way, fast
    try:
        t = time.monotonic()
        with pytest.raises(DataError, match="not reachable"):
            reader(tmp_path / "dl", format="yolov8", timeout=0.5).read()
        assert time.monotonic() - t < 2.5
    finally:
        _restore_api_url(old)


def test_server_error_does_not_leak_key(api, env, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    env.setenv(rfr.KEY_ENV, KEY)
    api.broken_project = True
    with pytest.raises(DataError) as e:
        reader(tmp_path / "dl").read()
    msg = str(e.value)
    assert "failed" in msg and "no such project" in msg and "***" in msg  # the echoed URL, redacted
    assert KEY not in msg and KEY not in repr(e.value.__cause__) and KEY not in repr(e.value.__context__)
    out = capsys.readouterr()
    assert KEY not in caplog.text and KEY not in out.out + out.err
    assert not (tmp_path / "dl").exists()
    assert not [p for p in tmp_path.iterdir() if ".download-" in p.name]


def test_wrong_key_is_refused(api, env, tmp_path):
    env.setenv(rfr.KEY_ENV, "rf_wrong_key_abc")
    with pytest.raises(DataError) as e:
        reader(tmp_path / "dl").read()
    assert "refused the API key (HTTP 401" in str(e.value) and "rf_wrong_key_abc" not in str(e.value)
    assert [q.split("?")[0] for q in api.requests] == ["POST /"]  # no retries


def test_key_in_config_is_refused(env, tmp_path):
    with pytest.raises(DataError) as e:
        reader(tmp_path, api_key=KEY)
    assert "never taken from the config" in str(e.value) and KEY not in str(e.value)


def test_missing_project_options(env, tmp_path):
    env.setenv(rfr.KEY_ENV, KEY)
    with pytest.raises(DataError, match=r"\['project'\] not set"):
        get_reader("roboflow")(tmp_path / "dl", workspace=WS, version=1).read()


def test_unknown_format(env, tmp_path):
    with pytest.raises(DataError, match="unknown format 'voc'"):
        reader(tmp_path, format="voc")


# --------------------------------------------------------------------------------------
# an export already on disk picks the reader of its format; no key, no network
# --------------------------------------------------------------------------------------
def test_present_coco_export_read_without_key(env, tmp_path):
    root = tmp_path / "export"
    with zipfile.ZipFile(io.BytesIO(coco_export_zip())) as z:
        z.extractall(root)
    env.setenv("API_URL", f"http://127.0.0.1:{_closed_port()}")  # would fail if it tried
    r = reader(root)
    assert len(r.read()) == 3 and r.inner.name == "coco" and not r.downloaded


def test_present_yolo_export(env, tmp_path):
    root = tmp_path / "yolo"
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "labels").mkdir(parents=True)
    (root / "data.yaml").write_text("names: ['glioma', 'meningioma', 'pituitary']\nnc: 3\n")
    (root / "train" / "images" / "a.jpg").write_bytes(_jpg(0))
    (root / "train" / "labels" / "a.txt").write_text("1 0.5 0.3125 0.375 0.3125\n")
    r = reader(root, format="yolov8")
    rec, = r.read()
    assert r.inner.name == "yolo" and rec.label == "meningioma"
    np.testing.assert_allclose(rec.boxes, [[0.3125, 0.15625, 0.6875, 0.46875]], atol=1e-5)


def test_present_tensorflow_csv_export(env, tmp_path):
    root = tmp_path / "tf"
    (root / "train").mkdir(parents=True)
    (root / "train" / "a.jpg").write_bytes(_jpg(0))
    (root / "train" / "_annotations.csv").write_text(
        "filename,width,height,class,xmin,ymin,xmax,ymax\na.jpg,64,64,glioma,20,10,44,30\n")
    r = reader(root, format="tensorflow")
    rec, = r.read()
    assert r.inner.name == "roboflow_csv" and rec.label == "glioma"


def test_options_pass_through_to_inner_reader(env, tmp_path):
    root = tmp_path / "export"
    with zipfile.ZipFile(io.BytesIO(coco_export_zip())) as z:
        z.extractall(root)
    recs = reader(root, source="br35h").read()
    assert {x.source for x in recs} == {"br35h"}
    with pytest.raises(DataError, match="unknown option"):
        reader(root, not_an_option=1).read()


def test_redact_helpers():
    assert rfr.redact(f"GET /x?api_key={KEY}&a=1", KEY) == "GET /x?api_key=***&a=1"
    assert rfr.redact("nothing", None) == "nothing"
    lg = logging.getLogger("urllib3.connectionpool")
    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    h = Grab()
    lg.addHandler(h)
    old = lg.level
    lg.setLevel(logging.DEBUG)
    try:
        with rfr.redacted_output(KEY):
            lg.debug("%s %s", "GET", f"/ws?api_key={KEY}")
        lg.debug("after %s", "x")
    finally:
        lg.removeHandler(h)
        lg.setLevel(old)
    assert records == ["GET /ws?api_key=***", "after x"]
