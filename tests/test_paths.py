"""Paths: local and URL globbing and tensorstore specs; and `fake_gcs`, an offline gs:// for the other tests.

`fake_gcs` makes `gs://` real enough to test every non-local code path without a network: epath's `gs` backend (the
one orbax, grain and blt_jax use) reads and writes an in-memory fsspec filesystem, and tensorstore's `gcs` driver
talks to a small local server of the GCS JSON API over the same objects. Other test modules import the fixture.
"""

import http.server
import json
import threading
import urllib.parse
import zlib
from unittest import mock

import pytest
from etils import epath
from etils.epath import backend, gpath
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.utils import stringify_path

from blt_jax import paths


class FakeGcsFs(MemoryFileSystem):
  """An in-memory fsspec filesystem that names objects as gcsfs does: `bucket/path`."""

  protocol = ("gs", "gcs")
  root_marker = ""
  store = {}  # its own, not MemoryFileSystem's
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = stringify_path(path)
    if path.startswith("gs://"):
      path = path[len("gs://") :]
    return path.rstrip("/")


class _FakeBackend(backend._FileSystemSpecBackend):  # pylint: disable=protected-access
  """epath's own fsspec backend (what `gs://` uses without TensorFlow), on the fake filesystem."""

  def __init__(self, fs):
    self._fs = fs

  def fs(self, path):
    return self._fs


def _generation(data):
  return str(zlib.crc32(data) + 1)


def _metadata(bucket, name, data):
  return {
      "kind": "storage#object",
      "bucket": bucket,
      "name": name,
      "size": str(len(data)),
      "generation": _generation(data),
      "metageneration": "1",
  }


class _GcsJsonApi(http.server.BaseHTTPRequestHandler):
  """The requests tensorstore's gcs driver makes: list, read (ranges, conditions), upload, delete."""

  protocol_version = "HTTP/1.1"
  fs = FakeGcsFs(skip_instance_cache=True)

  def log_message(self, *args):
    pass

  def _reply(self, code, body=b"", headers=()):
    if isinstance(body, dict):
      body = json.dumps(body).encode()
      headers = [("Content-Type", "application/json"), *headers]
    self.send_response(code)
    for key, value in headers:
      self.send_header(key, value)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def _request(self):
    url = urllib.parse.urlsplit(self.path)
    return [urllib.parse.unquote(p) for p in url.path.split("/")], dict(urllib.parse.parse_qsl(url.query))

  def _object(self, bucket, name):
    try:
      return self.fs.cat_file(f"{bucket}/{name}")
    except FileNotFoundError:
      return None

  def _failed_condition(self, data, query):
    generation = "0" if data is None else _generation(data)
    if query.get("ifGenerationMatch", generation) != generation:
      return 412
    if query.get("ifGenerationNotMatch") == generation:
      return 304
    return None

  def do_GET(self):  # pylint: disable=invalid-name
    parts, query = self._request()  # /storage/v1/b/BUCKET/o[/OBJECT]
    bucket = parts[4]
    if len(parts) == 6:
      lo, hi, prefix = query.get("startOffset", ""), query.get("endOffset"), query.get("prefix", "")
      items = [
          _metadata(bucket, name, self.fs.cat_file(key))
          for key in sorted(self.fs.store)
          for b, _, name in [key.partition("/")]
          if b == bucket and name >= lo and (hi is None or name < hi) and name.startswith(prefix)
      ]
      return self._reply(200, {"kind": "storage#objects", "items": items})
    name = parts[6]
    data = self._object(bucket, name)
    if data is None:
      return self._reply(404, {"error": {"code": 404, "message": "no such object"}})
    if code := self._failed_condition(data, query):
      return self._reply(code)
    if query.get("alt") != "media":
      return self._reply(200, _metadata(bucket, name, data))
    headers = [("x-goog-generation", _generation(data)), ("x-goog-metageneration", "1")]
    if byte_range := self.headers.get("Range"):
      lo, _, hi = byte_range.split("=", 1)[1].partition("-")
      lo, hi = int(lo), int(hi) if hi else len(data) - 1
      chunk = data[lo : hi + 1]
      return self._reply(206, chunk, headers + [("Content-Range", f"bytes {lo}-{lo + len(chunk) - 1}/{len(data)}")])
    return self._reply(200, data, headers)

  def do_POST(self):  # pylint: disable=invalid-name
    parts, query = self._request()  # /upload/storage/v1/b/BUCKET/o?uploadType=media&name=OBJECT
    bucket, name = parts[5], query["name"]
    body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
    if self._failed_condition(self._object(bucket, name), query):
      return self._reply(412)
    self.fs.pipe_file(f"{bucket}/{name}", body)
    return self._reply(200, _metadata(bucket, name, body))

  def do_DELETE(self):  # pylint: disable=invalid-name
    parts, query = self._request()
    bucket, name = parts[4], parts[6]
    data = self._object(bucket, name)
    if data is None:
      return self._reply(404, {"error": {"code": 404, "message": "no such object"}})
    if self._failed_condition(data, query):
      return self._reply(412)
    self.fs.rm_file(f"{bucket}/{name}")
    return self._reply(204)


_server = None


def _gcs_server_url():
  """One server per test session: tensorstore may read its endpoint once per process."""
  global _server
  if _server is None:
    _server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GcsJsonApi)
    threading.Thread(target=_server.serve_forever, daemon=True).start()
  return f"http://127.0.0.1:{_server.server_port}"


@pytest.fixture
def fake_gcs(monkeypatch):
  """An empty, offline gs:// for epath and tensorstore alike; yields the fake filesystem (objects: `fs.store`)."""
  fs = _GcsJsonApi.fs
  fs.store.clear()
  fs.pseudo_dirs[:] = [""]
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", _gcs_server_url())
  monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "fake-token")
  with mock.patch.dict(gpath._PREFIX_TO_BACKEND, {"gs": _FakeBackend(fs)}):  # pylint: disable=protected-access
    yield fs


# ----------------------------------------------------------------------------------------------------------- tests --


def test_resolve_keeps_urls_and_absolutises_local(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(paths.resolve("gs://bucket/runs/x")) == "gs://bucket/runs/x"
  assert str(paths.resolve("runs/x")) == str(tmp_path / "runs" / "x")
  assert paths.is_url("gs://b/x") and not paths.is_url("runs/x")


def _tree(root):
  for name in ["a.jsonl", "b.txt", "sub/c.jsonl", "sub/deeper/d.jsonl", "sub/.hidden.jsonl", ".cache/e.jsonl"]:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")


@pytest.mark.parametrize("where", ["local", "gs"])
def test_glob_local_and_url(where, tmp_path, request):
  if where == "gs":
    request.getfixturevalue("fake_gcs")
    root = "gs://bucket/data"
  else:
    root = str(tmp_path / "data")
  _tree(epath.Path(root))
  rel = lambda matches: [str(m)[len(root) + 1 :] for m in matches]
  found_root, matches = paths.glob(f"{root}/*.jsonl")
  assert str(found_root) == root and rel(matches) == ["a.jsonl"]
  _, matches = paths.glob(f"{root}/**/*.jsonl")  # `**`: zero or more directories, hidden names skipped
  assert rel(matches) == ["a.jsonl", "sub/c.jsonl", "sub/deeper/d.jsonl"]
  found_root, matches = paths.glob(f"{root}/s*/**/[cd].jsonl")
  assert str(found_root) == root and rel(matches) == ["sub/c.jsonl", "sub/deeper/d.jsonl"]
  assert paths.glob(f"{root}/nothing/*.jsonl")[1] == []


def test_kvstore_spec_per_scheme(tmp_path):
  assert paths.kvstore_spec(tmp_path / "s") == {"driver": "file", "path": f"{tmp_path}/s/"}
  assert paths.kvstore_spec("gs://bucket/stores/s") == {"driver": "gcs", "bucket": "bucket", "path": "stores/s/"}
  assert paths.kvstore_spec(epath.Path("gs://bucket/s"))["driver"] == "gcs"
  with pytest.raises(ValueError, match="az://container/s: tensorstore cannot store arrays at this URL"):
    paths.kvstore_spec("az://container/s")


def test_fake_gcs_is_shared_by_epath_and_tensorstore(fake_gcs):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorstore as ts  # pylint: disable=g-import-not-at-top

  spec = {"driver": "zarr", "kvstore": paths.kvstore_spec("gs://bucket/arr")}
  array = ts.open({**spec, "metadata": {"dtype": "<f4", "shape": [6], "chunks": [4]}}, create=True).result()
  array[1:5].write(np.arange(4, dtype=np.float32)).result()
  assert sorted(p.name for p in epath.Path("gs://bucket/arr").iterdir()) == [".zarray", "0", "1"]
  np.testing.assert_array_equal(ts.open(spec).result().read().result(), [0, 0, 1, 2, 3, 0])


def test_staged_dir_replaces_the_output_only_when_the_block_succeeds(tmp_path):
  out = epath.Path(tmp_path) / "export"
  out.mkdir()
  (out / "old.txt").write_text("old")
  with pytest.raises(RuntimeError, match="interrupted"):
    with paths.staged_dir(out, "exporting") as staging:
      (staging / "new.txt").write_text("half")
      raise RuntimeError("interrupted")
  assert sorted(p.name for p in out.iterdir()) == ["old.txt"]  # the old output is untouched
  assert not (epath.Path(tmp_path) / ".export.exporting").exists()  # and no staging directory is left
  (epath.Path(tmp_path) / ".export.exporting").mkdir()  # a leftover of a killed run is cleared first
  with paths.staged_dir(out, "exporting") as staging:
    (staging / "new.txt").write_text("new")
  assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
  file_out = epath.Path(tmp_path) / "single"
  file_out.write_text("a file in the way")
  with paths.staged_dir(file_out, "converting") as staging:
    (staging / "x").write_text("x")
  assert file_out.is_dir() and (file_out / "x").read_text() == "x"
