"""The command line of `python -m blt_jax.score` (see `blt_jax.score` for the scoring convention).

Output: one json line per document, appended and flushed as each batch completes, so a killed run leaves only
complete lines (a torn last line is dropped on `--resume`), and `--resume` skips every document already in the
file. Lines come in completion order; `index` is the document's position over all inputs (sort by it for input
order). A summary (documents, bytes, total bits, aggregate bpb, errors) goes to stderr and, atomically, to
`OUT.summary.json`; it is computed from the whole output file, so a resumed run reports the whole corpus.

Multi-host: process i of n writes the documents whose index is i mod n to `OUT.part-<i>-of-<n>`; the merged result
is the concatenation of the parts (`cat OUT.part-*-of-<n> > OUT`), each document in exactly one part. Without
`--mesh` each process is an independent replica scoring its own documents; with `--mesh` the processes run one job
over a mesh of all their devices (the model sharded across hosts, global batches of every document).
The processes start as the trainer's do (`jax.distributed` under srun, Open MPI, a TPU pod or
JAX_COORDINATOR_ADDRESS), so each task of a launcher scores its own share.

`--dtype bfloat16` stores the params and runs the matmuls in bfloat16 (entropies, softmax statistics and the NLL
stay float32); `--mesh fsdp=8` (or `fsdp=4,tensor=2`, ...) shards the params over this process's devices by the
training rules instead of giving each device a replica (`blt_jax.placement`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, Optional, Sequence, Set


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m blt_jax.score", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--checkpoint", required=True, help="converted checkpoint, or a training workdir / its export/")
  p.add_argument(
      "--input",
      action="append",
      required=True,
      help="a .jsonl / .txt / .parquet file or glob, or - for jsonl on stdin (repeatable)",
  )
  p.add_argument("--output", required=True, help="output .jsonl (one line per document)")
  p.add_argument("--text-field", default="text", help="text field of jsonl records / parquet column (default text)")
  p.add_argument("--whole-file", action="store_true", help=".txt inputs: the whole file is one document")
  p.add_argument("--with-eos", action="store_true", help="append EOS to every document and score it too")
  p.add_argument("--per-byte", action="store_true", help="add per-byte NLL (and entropies) lists to each line")
  p.add_argument("--resume", action="store_true", help="continue a killed run: keep OUTPUT, skip its documents")
  p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
  p.add_argument("--row-bytes", type=int, default=None, help="tokens per packed row (default: the safe maximum)")
  p.add_argument(
      "--min-context",
      type=int,
      default=None,
      help="left context (bytes) of every window of a document longer than a row (default row-bytes/2)",
  )
  p.add_argument("--batch-bytes", type=int, default=16384, help="tokens per batch")
  p.add_argument("--no-pack", action="store_true", help="one document per row (slower; for comparison)")
  p.add_argument("--process-index", type=int, default=None, help="this process's share (default: jax's)")
  p.add_argument("--process-count", type=int, default=None, help="number of shares (default: jax's)")
  from blt_jax import placement  # pylint: disable=g-import-not-at-top

  placement.add_arguments(p)
  return p


class _Output:
  """Append-only jsonl output with resume: a torn last line is cut off, done indices are remembered."""

  def __init__(self, path: str, resume: bool, overwrite: bool):
    self.path = path
    self.done: Set[int] = set()
    if os.path.exists(path):
      if not (resume or overwrite):
        raise FileExistsError(f"{path} exists; pass --resume to continue it or --overwrite to replace it")
      if overwrite and not resume:
        os.remove(path)
      else:
        self._recover()
    self._file = None
    self._synced = 0.0

  def _recover(self) -> None:
    with open(self.path, "rb") as f:
      data = f.read()
    keep = data.rfind(b"\n") + 1  # a line without its newline was being written when the run died
    if keep < len(data):
      with open(self.path, "r+b") as f:
        f.truncate(keep)
    for number, line in enumerate(data[:keep].splitlines(), 1):
      try:
        self.done.add(int(json.loads(line)["index"]))
      except (ValueError, KeyError, TypeError):
        raise ValueError(f"{self.path}:{number}: not a line written by blt_jax.score; cannot resume it") from None

  def write(self, line: str) -> None:
    """Appends one complete line; flushed at once, fsynced at most every second."""
    if self._file is None:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      self._file = open(self.path, "a", encoding="utf-8")
    self._file.write(line + "\n")
    self._file.flush()
    now = time.monotonic()
    if now - self._synced >= 1.0:
      os.fsync(self._file.fileno())
      self._synced = now

  def close(self) -> None:
    if self._file is not None:
      self._file.flush()
      os.fsync(self._file.fileno())
      self._file.close()


def summarize(path: str, errors: int) -> Dict[str, float]:
  docs = n_bytes = 0
  nats = 0.0
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        record = json.loads(line)
        docs += 1
        n_bytes += record["n_bytes"]
        nats += record["nll_nats"]
  bits = nats / math.log(2)
  return dict(
      documents=docs, bytes=n_bytes, total_bits=bits, bpb=bits / n_bytes if n_bytes else float("nan"), errors=errors
  )


def _write_json_atomic(path: str, value) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class _Progress:

  def __init__(self):
    self.start = self.last = time.perf_counter()
    self.docs = self.bytes = 0
    self.tty = sys.stderr.isatty()

  def update(self, docs: int, n_bytes: int, force: bool = False) -> None:
    self.docs += docs
    self.bytes += n_bytes
    now = time.perf_counter()
    if force or now - self.last >= (0.5 if self.tty else 15.0):
      self.last = now
      rate = self.bytes / max(now - self.start, 1e-9)
      line = f"scored {self.docs} documents, {self.bytes} bytes, {rate:,.0f} bytes/s"
      print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)


def _all_processes_done(done: Set[int]) -> Set[int]:
  """The union of every process's done indices (each process holds its own part's)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([len(done)], np.int32)))
  padded = np.full((max(int(sizes.max()), 1),), -1, np.int32)
  padded[: len(done)] = sorted(done)
  everyone = np.asarray(multihost_utils.process_allgather(padded))
  return {int(i) for i in everyone.ravel() if i >= 0}


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parser().parse_args(argv)
  # Everything that can fail on the user's arguments fails here, before jax starts or anything is written.
  from blt_jax import loading, placement, score, score_inputs, sharding  # pylint: disable=g-import-not-at-top

  try:
    score_inputs.expand(args.input)
    mesh_spec = placement.parse_mesh(args.mesh)  # a bad flag fails before jax starts
    sharding.maybe_initialize_distributed()  # as the trainer starts: under srun / on a pod, each task is one share
    import jax  # pylint: disable=g-import-not-at-top
    # --mesh with several processes: one job over a mesh of every process's devices; without: a replica per process.
    one_job = mesh_spec is not None and jax.process_count() > 1
    mesh = placement.make_mesh(mesh_spec, across_processes=one_job) if mesh_spec else None
    if one_job and (args.process_index is not None or args.process_count is not None):
      raise ValueError(
          "--process-index / --process-count split the documents between independent replicas; with "
          "--mesh over several processes they run one job: leave them unset"
      )
    model = loading.load(args.checkpoint, args.dtype, mesh)
    scorer = score.Scorer(
        model,
        row_bytes=args.row_bytes,
        min_context=args.min_context,
        batch_bytes=args.batch_bytes,
        with_eos=args.with_eos,
        per_byte=args.per_byte,
        pack=not args.no_pack,
    )
    print(f"scoring with {placement.startup_line(args.dtype, scorer.mesh)}", file=sys.stderr, flush=True)
    index = jax.process_index() if args.process_index is None else args.process_index
    count = jax.process_count() if args.process_count is None else args.process_count
    if not 0 <= index < count:
      raise ValueError(f"--process-index {index} is not in [0, --process-count {count})")
    out_path = args.output if count == 1 else f"{args.output}.part-{index}-of-{count}"
    output = _Output(out_path, args.resume, args.overwrite)
    # One job: every process feeds the same documents, so all skip what any part already holds.
    skip = _all_processes_done(output.done) if scorer.spans_processes else output.done
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  errors = 0
  progress = _Progress()

  def documents():
    nonlocal errors
    for record in score_inputs.read(args.input, args.text_field, args.whole_file):
      mine = record.index % count == index
      if record.index in skip or not (mine or scorer.spans_processes):
        continue
      if isinstance(record, score_inputs.InputError):
        if mine:
          errors += 1
          print(f"warning: {record} (skipped)", file=sys.stderr, flush=True)
        continue
      yield record.index, record.id, score_inputs.tokens_of(record.data, args.with_eos)

  compiled = 0
  try:
    for result in scorer.score_stream(documents()):
      if result.index % count != index:  # one job: another process's part holds this document
        continue
      output.write(json.dumps(result.to_json()))
      progress.update(1, result.n_bytes)
      for program, shape in scorer.compiles[compiled:]:
        print(
            f"compiled the {program} program for shape {shape} ({len(scorer.compiles)} so far)",
            file=sys.stderr,
            flush=True,
        )
      compiled = len(scorer.compiles)
    progress.update(0, 0, force=True)
  except ValueError as e:
    print(f"\nerror: {e}", file=sys.stderr)
    return 2
  finally:
    output.close()
  if progress.tty:
    print(file=sys.stderr)
  summary = summarize(out_path, errors)
  summary.update(
      seconds=time.perf_counter() - progress.start,
      compiled_programs=len(scorer.compiles),
      bytes_per_s_this_run=progress.bytes / max(time.perf_counter() - progress.start, 1e-9),
  )
  _write_json_atomic(f"{out_path}.summary.json", summary)
  print(
      f"summary: {summary['documents']} documents, {summary['bytes']} bytes, {summary['total_bits']:.1f} bits, "
      f"{summary['bpb']:.4f} bpb, {summary['errors']} errors ({len(scorer.compiles)} programs compiled; "
      f"{out_path}.summary.json)",
      file=sys.stderr,
  )
  return 0
