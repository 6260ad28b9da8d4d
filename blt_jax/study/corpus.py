"""The study's text, prepared offline: training and held-out documents, and where every byte came from.

Training: the running Python's standard library sources (code) and the reStructuredText sources of the Python
documentation (English prose, Debian package python3.11-doc). Held-out: the Debian Administrator's Handbook in
English (package debian-handbook, HTML turned into text): another source, another kind of prose. Documents are
files (training) or runs of whole paragraphs up to `heldout_doc_bytes` (held-out), picked in a seeded order until
each byte budget is met. Every document is valid UTF-8 (undecodable bytes become U+FFFD once, here), so the byte
models and the BPE tokenizer see exactly the same bytes.

`--smoke` needs no package: it trains on some stdlib files and holds out other stdlib files (not another source;
it only checks that the pipeline runs).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import html.parser
import json
import os
import random
import re
import subprocess
from typing import Dict, Iterable, List, Sequence, Tuple

from blt_jax.data import sources as sources_lib
from blt_jax.study import io

PYTHON_DOC_PACKAGE = "python3.11-doc"
HANDBOOK_PACKAGE = "debian-handbook"
PYTHON_DOC_GLOB = "usr/share/doc/python3.11/html/_sources/**/*.rst.txt"
HANDBOOK_GLOB = "usr/share/doc/debian-handbook/html/en-US/*.html"
MAX_FILE_BYTES = 200_000  # larger training files (generated tables) would dominate a small corpus


@dataclasses.dataclass(frozen=True)
class Document:
  text: str
  origin: str  # "<source>:<path inside it>[#part]"


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
  """How much of what: the split and its seed are fixed by these fields."""

  train_bytes: int  # training documents, split evenly over the training sources
  heldout_bytes: int
  heldout_doc_bytes: int = 4096  # held-out documents: runs of whole paragraphs up to this many bytes
  seed: int = 0
  smoke: bool = False
  max_file_bytes: int = MAX_FILE_BYTES  # larger files are left out


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _utf8(raw: bytes) -> str:
  return raw.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------------------
# Debian packages.


def fetch_deb(package: str, debs_dir: str) -> str:
  """Path of `package`'s .deb in `debs_dir`, downloaded there with `apt-get download` when it is not yet there."""
  os.makedirs(debs_dir, exist_ok=True)
  found = sorted(glob.glob(os.path.join(debs_dir, f"{package}_*.deb")))
  if not found:
    try:
      subprocess.run(["apt-get", "download", package], cwd=debs_dir, check=True, capture_output=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
      raise RuntimeError(
          f"no {package}_*.deb in {debs_dir} and `apt-get download {package}` failed ({e}); "
          f"download it once on a machine with Debian's archive and put it in {debs_dir}"
      ) from None
    found = sorted(glob.glob(os.path.join(debs_dir, f"{package}_*.deb")))
  if not found:
    raise RuntimeError(f"`apt-get download {package}` left no {package}_*.deb in {debs_dir}")
  return found[-1]


def extract_deb(deb: str, into: str) -> str:
  """`dpkg-deb -x` of `deb` into `into` (once; a marker file records it)."""
  marker = os.path.join(into, ".extracted")
  if not os.path.isfile(marker):
    os.makedirs(into, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", deb, into], check=True)
    io.write_text(marker, os.path.basename(deb) + "\n")
  return into


class _TextOfHtml(html.parser.HTMLParser):
  """The visible text of an HTML page, one paragraph per block element; <head>, scripts and styles dropped."""

  BLOCKS = {
      "p",
      "div",
      "pre",
      "li",
      "dt",
      "dd",
      "tr",
      "h1",
      "h2",
      "h3",
      "h4",
      "h5",
      "h6",
      "br",
      "table",
      "blockquote",
      "section",
      "title",
  }
  SKIP = {"head", "script", "style"}

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.parts: List[str] = []
    self.skipping = 0

  def handle_starttag(self, tag, attrs):
    if tag in self.SKIP:
      self.skipping += 1
    elif tag in self.BLOCKS:
      self.parts.append("\n\n")

  def handle_endtag(self, tag):
    if tag in self.SKIP:
      self.skipping = max(0, self.skipping - 1)
    elif tag in self.BLOCKS:
      self.parts.append("\n\n")

  def handle_data(self, data):
    if not self.skipping:
      self.parts.append(data)


def html_paragraphs(raw: bytes) -> List[str]:
  """Paragraphs of visible text of an HTML page, whitespace inside each collapsed per line."""
  parser = _TextOfHtml()
  parser.feed(_utf8(raw))
  parser.close()
  paragraphs = []
  for block in re.split(r"\n\s*\n", "".join(parser.parts)):
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in block.splitlines()]
    text = "\n".join(line for line in lines if line)
    if text:
      paragraphs.append(text)
  return paragraphs


def group_paragraphs(paragraphs: Sequence[str], max_bytes: int) -> List[str]:
  """Consecutive paragraphs joined by blank lines into documents of at most `max_bytes` (a longer one alone)."""
  docs, current, size = [], [], 0
  for p in paragraphs:
    n = len(p.encode("utf-8")) + 2
    if current and size + n > max_bytes:
      docs.append("\n\n".join(current))
      current, size = [], 0
    current.append(p)
    size += n
  if current:
    docs.append("\n\n".join(current))
  return docs


# ---------------------------------------------------------------------------------------------------------------
# Sources: (file record, documents of that file) in a fixed order.


def _file_record(source: str, root: str, path: str, package: str = "") -> dict:
  return dict(
      source=source,
      package=package,
      path=os.path.relpath(path, root),
      size=os.path.getsize(path),
      sha256=sha256_file(path),
  )


def stdlib_files(max_bytes: int = MAX_FILE_BYTES) -> List[Tuple[dict, List[str]]]:
  import sysconfig  # pylint: disable=g-import-not-at-top

  root = sysconfig.get_paths()["stdlib"]
  out = []
  for path, _ in sources_lib.stdlib_files(include_tests=False):
    path = str(path)
    if os.path.getsize(path) <= max_bytes:
      with open(path, "rb") as f:
        out.append((_file_record("stdlib", root, path), [_utf8(f.read())]))
  return out


def _package_files(source: str, package: str, root: str, pattern: str, to_docs) -> List[Tuple[dict, List[str]]]:
  out = []
  for path in sorted(glob.glob(os.path.join(root, pattern), recursive=True)):
    if os.path.getsize(path) <= MAX_FILE_BYTES:
      with open(path, "rb") as f:
        docs = to_docs(f.read())
      if docs:
        out.append((_file_record(source, root, path, package), docs))
  return out


def python_doc_files(root: str) -> List[Tuple[dict, List[str]]]:
  return _package_files("python-doc", PYTHON_DOC_PACKAGE, root, PYTHON_DOC_GLOB, lambda raw: [_utf8(raw)])


def handbook_files(root: str, doc_bytes: int) -> List[Tuple[dict, List[str]]]:
  return _package_files(
      "debian-handbook",
      HANDBOOK_PACKAGE,
      root,
      HANDBOOK_GLOB,
      lambda raw: group_paragraphs(html_paragraphs(raw), doc_bytes),
  )


def take(
    files: Sequence[Tuple[dict, List[str]]], budget: int, rng: random.Random, split: str
) -> Tuple[List[Document], List[dict]]:
  """Documents from `files`, whole files in a seeded order, until `budget` bytes; and the files' records."""
  order = list(range(len(files)))
  rng.shuffle(order)
  docs, records, used = [], [], 0
  for i in order:
    if used >= budget:
      break
    record, texts = files[i]
    n = sum(len(t.encode("utf-8")) for t in texts)
    for part, text in enumerate(texts):
      suffix = f"#{part}" if len(texts) > 1 else ""
      docs.append(Document(text, f"{record['source']}:{record['path']}{suffix}"))
    records.append(dict(record, split=split, bytes_used=n, documents=len(texts)))
    used += n
  return docs, records


# ---------------------------------------------------------------------------------------------------------------
# The prepared corpus on disk.


def _write_jsonl(path: str, docs: Iterable[Document]) -> None:
  io.write_text(path, "".join(json.dumps(dict(text=d.text, origin=d.origin)) + "\n" for d in docs))


def read_jsonl(path: str) -> List[Document]:
  with open(path, encoding="utf-8") as f:
    return [Document(r["text"], r["origin"]) for r in map(json.loads, f)]


def _stats(docs: Sequence[Document]) -> dict:
  return dict(documents=len(docs), bytes=sum(len(d.text.encode("utf-8")) for d in docs))


def _packages(debs_dir: str, extract_root: str) -> Tuple[Dict[str, str], List[dict]]:
  roots, records = {}, []
  for package in (PYTHON_DOC_PACKAGE, HANDBOOK_PACKAGE):
    deb = fetch_deb(package, debs_dir)
    roots[package] = extract_deb(deb, os.path.join(extract_root, package))
    records.append(dict(package=package, deb=os.path.basename(deb), size=os.path.getsize(deb), sha256=sha256_file(deb)))
  return roots, records


def _select(spec: CorpusSpec, debs_dir: str, extract_root: str):
  rng = random.Random(spec.seed)
  code = stdlib_files(spec.max_file_bytes)
  if spec.smoke:
    rng.shuffle(code)
    half = len(code) // 2
    train, train_files = take(code[:half], spec.train_bytes, rng, "train")
    heldout, heldout_files = take(code[half:], spec.heldout_bytes, rng, "heldout")
    return train, heldout, train_files + heldout_files, []
  roots, packages = _packages(debs_dir, extract_root)
  code_docs, code_files = take(code, spec.train_bytes // 2, rng, "train")
  prose_docs, prose_files = take(python_doc_files(roots[PYTHON_DOC_PACKAGE]), spec.train_bytes // 2, rng, "train")
  heldout, heldout_files = take(
      handbook_files(roots[HANDBOOK_PACKAGE], spec.heldout_doc_bytes), spec.heldout_bytes, rng, "heldout"
  )
  train = code_docs + prose_docs
  rng.shuffle(train)
  return train, heldout, code_files + prose_files + heldout_files, packages


def prepare(spec: CorpusSpec, data_dir: str, debs_dir: str) -> dict:
  """Writes `data_dir/{train,heldout}.jsonl` and `manifest.json` (reused when the spec is unchanged)."""
  manifest_path = os.path.join(data_dir, "manifest.json")
  manifest = io.read_json(manifest_path)
  if manifest is not None and manifest["spec"] == dataclasses.asdict(spec):
    return manifest
  train, heldout, files, packages = _select(spec, debs_dir, os.path.join(data_dir, "extracted"))
  if not train or not heldout:
    raise RuntimeError(f"corpus preparation found {len(train)} training and {len(heldout)} held-out documents")
  paths = dict(train=os.path.join(data_dir, "train.jsonl"), heldout=os.path.join(data_dir, "heldout.jsonl"))
  _write_jsonl(paths["train"], train)
  _write_jsonl(paths["heldout"], heldout)
  manifest = dict(
      spec=dataclasses.asdict(spec),
      paths=paths,
      train=_stats(train),
      heldout=_stats(heldout),
      packages=packages,
      files=files,
      sources=dict(
          train=sorted({f["source"] for f in files if f["split"] == "train"}),
          heldout=sorted({f["source"] for f in files if f["split"] == "heldout"}),
      ),
      jsonl_sha256={k: sha256_file(p) for k, p in paths.items()},
  )
  io.write_json(manifest_path, manifest)
  return manifest
