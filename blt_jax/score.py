"""Jitted batch scoring: per-document negative log-likelihood and bits-per-byte of a BLT with its own patcher.

  python -m blt_jax.score --checkpoint CKPT --input 'data/*.jsonl' --output scores.jsonl

Convention: a document is `[BOS] + its bytes` (`+ [EOS]` with `with_eos`); `nll_nats` sums -ln p(byte | BOS and the
bytes before it) over every document byte (and the EOS with `with_eos`), with patches from the checkpoint's own
patcher (entropy model in-graph, fp32 comparisons); `bpb = nll_nats / ln 2 / n_bytes`, `n_bytes` counting the
scored targets.

Throughput: documents are packed into fixed-length rows (the document rule in `masks` keeps them independent, so
a packed document scores as it does alone), rows fall into a few length buckets, and each batch gets the smallest
of a few patch-slot counts that holds its rows' patches (counted by the patcher first), so the number of compiled
programs is bounded (at most len(row buckets) x len(slot buckets) + len(row buckets); `Scorer.compiles` lists them).

Long documents (more than `row_bytes` tokens) are scored in overlapping windows: window w reads `[BOS]` + bytes
`[a, b)` and scores bytes `[c, b)` where `c - a >= min_context`; every byte is scored exactly once, each with at
least `min_context` bytes of left context (all of it for bytes in the first window). Never truncated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from blt_jax import loading, patching, placement, score_inputs, sharding, tokenizer
from blt_jax.entropy_model import compute_entropies
from blt_jax.generate import NOT_BYTES
from blt_jax.model import BLT

MIN_ROW_BUCKET = 64
MIN_SLOT_BUCKET = 16


@dataclasses.dataclass
class DocScore:
  index: int
  id: str
  n_bytes: int  # scored targets: the document's bytes (+ EOS with with_eos)
  nll_nats: float
  n_patches: int  # patches starting inside the document (its [BOS] patch included)
  nll_per_byte: Optional[np.ndarray] = None  # [n_bytes] nats
  entropies: Optional[np.ndarray] = None  # [n_bytes] entropy (nats) of the entropy model's prediction of each byte
  greedy_per_byte: Optional[np.ndarray] = None  # [n_bytes] the id greedy generation picks where each byte is predicted

  @property
  def bpb(self) -> float:
    return self.nll_nats / math.log(2) / self.n_bytes

  def to_json(self) -> Dict[str, Any]:
    out = dict(
        index=self.index,
        id=self.id,
        n_bytes=self.n_bytes,
        nll_nats=self.nll_nats,
        bpb=self.bpb,
        n_patches=self.n_patches,
    )
    if self.nll_per_byte is not None:
      out["nll"] = [float(v) for v in self.nll_per_byte]
    if self.entropies is not None:
      out["entropies"] = [float(v) for v in self.entropies]
    return out


@dataclasses.dataclass
class _Piece:
  doc: int  # key of the document's accumulator
  part: int  # window number within the document
  tokens: np.ndarray  # int32 model input, starts with BOS
  score_from: int  # position (in `tokens`) of the first scored target
  counts_bos_patch: bool  # the document's first window: its [BOS] patch counts


@dataclasses.dataclass
class _Pending:
  index: int
  id: str
  parts_left: int
  parts: Dict[int, Tuple[np.ndarray, np.ndarray, int, Optional[np.ndarray]]] = dataclasses.field(default_factory=dict)


def split_document(tokens: np.ndarray, row_len: int, min_context: int) -> List[Tuple[np.ndarray, int, bool]]:
  """The long-document rule: (window input, first scored position, is first window) for one document."""
  T = len(tokens)
  if T <= row_len:
    return [(tokens, 1, True)]
  if not 0 < min_context < row_len - 1:
    raise ValueError(f"min_context={min_context} must be in [1, row_bytes - 2 = {row_len - 2}]")
  windows = [(tokens[:row_len], 1, True)]
  c = row_len  # next target to score
  while c < T:
    a = c - min_context
    b = min(T, a + row_len - 1)
    windows.append((np.concatenate([[tokenizer.BOS_ID], tokens[a:b]]).astype(np.int32), 1 + c - a, False))
    c = b
  return windows


def _buckets(row_len: int) -> List[int]:
  sizes, b = {row_len}, MIN_ROW_BUCKET
  while b < row_len:
    sizes.add(b)
    b *= 2
  return sorted(sizes)


def _slot_bucket(needed: int, num_positions: int) -> int:
  """Patch slots of the global model's program: the next of 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, ...
  (quarter-octave steps: at most a fifth of the slots are padding, at four programs per octave; from 512 on every
  bucket is a multiple of 128), capped by the row's positions. The global model's time is linear in the slots, so
  half-octave steps (768 slots for 630 patches) cost up to a third more than needed."""
  p = MIN_SLOT_BUCKET
  while p < needed:
    for quarters in (5, 6, 7):
      if p * quarters // 4 >= needed:
        return min(p * quarters // 4, num_positions)
    p *= 2
  return min(p, num_positions)


def _check_arguments(row_len: int, min_context: int, batch_bytes: int, max_bytes: int) -> None:
  """Fails on arguments that could only fail later (at the first document longer than a row)."""
  # A later window reads [BOS], min_context >= 1 bytes of context and at least one byte it scores.
  if not 3 <= row_len <= max_bytes:
    raise ValueError(f"row_bytes={row_len} must be in [3, max_encoder_seq_length={max_bytes}]")
  if not 1 <= min_context <= row_len - 2:
    raise ValueError(f"min_context={min_context} must be in [1, row_bytes - 2 = {row_len - 2}]")
  if batch_bytes < 1:
    raise ValueError(f"batch_bytes={batch_bytes} must be positive")


class Scorer:
  """Scores documents with a BLT checkpoint. Usable in user code:

    scorer = Scorer("checkpoints/blt_1b")
    scores = scorer.score_texts(["Hello", "world"])      # [DocScore], in input order
    scores = scorer.score_arrays([ids_0, ids_1])         # `[BOS] bytes` model ids, the same numbers

  `row_bytes`: tokens per packed row (default: the largest that can never need more patch slots than the global
  model's `max_seqlen`, capped by `max_encoder_seq_length`; at least 3); `min_context`: left context of
  long-document windows (in [1, row_bytes - 2], default row_bytes // 2); `batch_bytes`: tokens per batch (rows per
  batch = batch_bytes // row length, a multiple of the local device count); all three checked here, before any
  document. Rows are sharded over every local device. `pack=False` gives every document (window)
  a row of its own (for comparison: the numbers are the same, the speed is not). `per_byte_argmax=True` also stores
  `DocScore.greedy_per_byte`: at each scored byte, the argmax of its predictive distribution over the ids greedy
  generation may pick (`generate.NOT_BYTES` excluded), i.e. whether greedy decoding would have produced the byte.
  `dtype` ("float32" | "bfloat16") and `mesh` (a `placement.make_mesh` mesh): how the params are stored and laid out
  (`loading.as_model`); rows then go over the mesh's batch axes, and a mesh spanning processes runs one job.
  """

  def __init__(
      self,
      checkpoint: Union[str, loading.LoadedModel],
      *,
      row_bytes: Optional[int] = None,
      min_context: Optional[int] = None,
      batch_bytes: int = 16384,
      with_eos: bool = False,
      per_byte: bool = False,
      pack: bool = True,
      devices: Optional[Sequence[Any]] = None,
      per_byte_argmax: bool = False,
      dtype: Optional[str] = None,
      mesh: Optional[Mesh] = None,
  ):
    self.model = loading.as_model(checkpoint, dtype, mesh)
    cfg = self.model.config
    safe = min(cfg.max_encoder_seq_length, cfg.max_seqlen - 1)
    self.row_len = int(safe if row_bytes is None else row_bytes)
    self.min_context = int(min_context if min_context is not None else self.row_len // 2)
    _check_arguments(self.row_len, self.min_context, batch_bytes, cfg.max_encoder_seq_length)
    self.with_eos, self.per_byte, self.pack = with_eos, per_byte, pack
    self.per_byte_argmax = per_byte_argmax
    # Rows go over the mesh's batch axes (data x fsdp). A model placed on a mesh keeps its params as they are;
    # otherwise every device gets a replica.
    self.mesh = self.model.mesh or placement.make_mesh(None, devices)
    self._rows_sharding = NamedSharding(self.mesh, PartitionSpec(sharding.BATCH_AXES))
    self._params_sharding = None if self.model.mesh is not None else NamedSharding(self.mesh, PartitionSpec())
    self._params = self._placed(self.model.params)
    self._entropy_params = self._placed(self.model.entropy_params)
    self._ndev = sharding.num_batch_shards(self.mesh)
    # One job over several processes: every process packs the same documents into the same batches, each feeds the
    # rows its devices hold and reads every row's result back (`_to_rows`, `_to_host`).
    self.spans_processes = any(d.process_index != jax.process_index() for d in self.mesh.devices.flat)
    self.batch_bytes = int(batch_bytes)
    self.buckets = _buckets(self.row_len)
    self.compiles: List[Tuple[str, Tuple[int, ...]]] = []  # (program, shape) at every trace
    self._patch_fns: Dict[int, Any] = {}
    self._nll_fns: Dict[Tuple[int, int], Any] = {}

  def set_params(self, params) -> None:
    """Scores with other params of the same model (e.g. later checkpoints of one run); the compiled programs take
    params as an argument, so they are reused."""
    if jax.tree.structure(params) != jax.tree.structure(self.model.params):
      raise ValueError("Scorer.set_params: the params do not have the loaded model's structure")
    # In the loaded model's dtype and layout.
    params = placement.place(
        params, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.model.params)
    )
    self.model = dataclasses.replace(self.model, params=params)
    self._params = self._placed(params)

  def _to_rows(self, x: np.ndarray) -> jax.Array:
    """A batch (the same on every process) as rows over the mesh's batch axes."""
    if not self.spans_processes:
      return jax.device_put(x, self._rows_sharding)
    return jax.make_array_from_callback(x.shape, self._rows_sharding, lambda index: x[index])

  def _to_host(self, x: jax.Array) -> np.ndarray:
    """A batch's result, whole, on this host (gathered from every process when the mesh spans several)."""
    if not self.spans_processes:
      return np.asarray(x)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  def _placed(self, params):
    if params is None or self._params_sharding is None:
      return params
    return jax.device_put(params, self._params_sharding)

  # -------------------------------------------------------------------------------------------------------------
  # Jitted programs.

  def _patch_fn(self, N: int):
    if N not in self._patch_fns:
      model, compiles, mesh = self.model, self.compiles, self.mesh

      def fn(entropy_params, tokens_BN, used_B):
        compiles.append(("patcher", tuple(tokens_BN.shape)))
        if model.entropy_config is not None:
          with sharding.mesh_while_tracing(mesh):
            entropies_BN = compute_entropies(entropy_params, tokens_BN, model.entropy_config)
        else:
          entropies_BN = jnp.zeros(tokens_BN.shape, jnp.float32)
        patches = patching.patch(tokens_BN, entropies_BN, max_patches=N + 1, **model.patching.patch_kwargs())
        ids_BT = patches.patch_ids_BT
        starts_BT = ids_BT != jnp.pad(ids_BT, ((0, 0), (1, 0)), constant_values=-1)[:, : N + 1]
        # The padding after a row's last document is one patch: it costs one slot, not one per pad byte. Only
        # the slot after the last document's bytes changes, which no scored byte reads (spec 10.3).
        pos_1T = jnp.arange(N + 1)[None, :]
        starts_BT = jnp.where(pos_1T > used_B[:, None], False, starts_BT)
        tail = patching.starts_to_patches(starts_BT, N + 1)
        return entropies_BN, tail.patch_lengths_BP, tail.num_patches_B, starts_BT[:, :N]

      self._patch_fns[N] = jax.jit(fn, out_shardings=self._rows_sharding)
    return self._patch_fns[N]

  def _nll_fn(self, N: int, P: int):
    if (N, P) not in self._nll_fns:
      cfg, compiles, argmax, mesh = self.model.config, self.compiles, self.per_byte_argmax, self.mesh

      def fn(params, tokens_BN, lengths_BP):
        compiles.append(("blt", (tokens_BN.shape[0], N, P)))
        with sharding.mesh_while_tracing(mesh):
          logits_BNV = BLT(cfg).apply({"params": params}, tokens_BN, lengths_BP)
        logp_BNV = jax.nn.log_softmax(logits_BNV[:, :-1].astype(jnp.float32), axis=-1)
        nll_BN = -jnp.take_along_axis(logp_BNV, tokens_BN[:, 1:, None], axis=-1)[..., 0]
        nll_BN = jnp.pad(nll_BN, ((0, 0), (0, 1)))  # position t: -ln p(tokens[t + 1])
        if not argmax:
          return nll_BN, None
        # The id greedy generation picks at position t (the masking `generate.choose` applies).
        masked_BNV = logits_BNV.astype(jnp.float32).at[..., jnp.asarray(NOT_BYTES)].set(-jnp.inf)
        return nll_BN, jnp.argmax(masked_BNV, axis=-1).astype(jnp.int32)

      self._nll_fns[(N, P)] = jax.jit(fn, out_shardings=self._rows_sharding)
    return self._nll_fns[(N, P)]

  def rows_per_batch(self, N: int) -> int:
    rows = max(1, self.batch_bytes // N)
    return -(-rows // self._ndev) * self._ndev

  def _run_batch(self, N: int, rows: List[List[Tuple[_Piece, int]]]):
    """Scores one batch of packed rows; returns (piece, nll, entropies, patch count, greedy ids) per piece."""
    R = self.rows_per_batch(N)
    tokens = np.zeros((R, N), np.int32)  # rows past len(rows) are padding: all BOE, results unused
    used = np.ones((R,), np.int32)
    for r, row in enumerate(rows):
      for piece, offset in row:
        tokens[r, offset : offset + len(piece.tokens)] = piece.tokens
        used[r] = offset + len(piece.tokens)
    tokens_dev = self._to_rows(tokens)
    entropies, lengths, num_patches, starts = self._patch_fn(N)(self._entropy_params, tokens_dev, self._to_rows(used))
    needed = int(np.max(self._to_host(num_patches)))
    if needed > self.model.config.max_seqlen:
      raise ValueError(
          f"a row of {N} bytes needs {needed} patches, more than the model's max_seqlen="
          f"{self.model.config.max_seqlen}; use a smaller row_bytes (--row-bytes)"
      )
    P = _slot_bucket(needed, min(N + 1, self.model.config.max_seqlen))  # rows may be longer than the patch context
    nll, greedy = self._nll_fn(N, P)(self._params, tokens_dev, lengths[:, :P])
    nll, greedy = self._to_host(nll), None if greedy is None else self._to_host(greedy)
    entropies, starts = self._to_host(entropies), self._to_host(starts)
    out = []
    for r, row in enumerate(rows):
      for piece, offset in row:
        L = len(piece.tokens)
        # Targets score_from..L-1 are predicted at positions score_from-1..L-2.
        lo, hi = offset + piece.score_from - 1, offset + L - 1
        first = offset if piece.counts_bos_patch else offset + piece.score_from
        out.append(
            (
                piece,
                nll[r, lo:hi],
                entropies[r, lo:hi],
                int(starts[r, first : offset + L].sum()),
                None if greedy is None else greedy[r, lo:hi],
            )
        )
    return out

  # -------------------------------------------------------------------------------------------------------------
  # Packing and streaming.

  def _pieces(self, key: int, tokens: np.ndarray) -> List[_Piece]:
    return [
        _Piece(key, i, t, s, f) for i, (t, s, f) in enumerate(split_document(tokens, self.row_len, self.min_context))
    ]

  def score_stream(self, documents: Iterable[Tuple[int, str, np.ndarray]]) -> Iterator[DocScore]:
    """(index, id, `[BOS] ...` ids) -> DocScore, yielded as documents complete (not in input order)."""
    pending: Dict[int, _Pending] = {}
    queues: Dict[int, List[List[Tuple[_Piece, int]]]] = {}
    row: List[Tuple[_Piece, int]] = []
    used = 0

    def close_row():
      nonlocal row, used
      if row:
        N = next(b for b in self.buckets if b >= used)
        queues.setdefault(N, []).append(row)
      row, used = [], 0

    def run(N: int, rows):
      for piece, *part in self._run_batch(N, rows):
        doc = pending[piece.doc]
        doc.parts[piece.part] = tuple(part)
        doc.parts_left -= 1
        if doc.parts_left == 0:
          yield self._finish(pending.pop(piece.doc))

    def ready():
      for N in list(queues):
        while len(queues[N]) >= self.rows_per_batch(N):
          rows, queues[N] = queues[N][: self.rows_per_batch(N)], queues[N][self.rows_per_batch(N) :]
          yield from run(N, rows)

    for key, (index, doc_id, tokens) in enumerate(documents):
      tokens = np.asarray(tokens, np.int32)
      if tokens.ndim != 1 or len(tokens) < 2 or tokens[0] != tokenizer.BOS_ID:
        raise ValueError(f"document {doc_id!r}: expected 1-D ids `[BOS] bytes...` with at least one byte")
      pieces = self._pieces(key, tokens)
      pending[key] = _Pending(index, doc_id, len(pieces))
      for piece in pieces:
        if used + len(piece.tokens) > self.row_len or not self.pack:
          close_row()
          yield from ready()  # a long document's windows run as batches fill, not all queued first
        row.append((piece, used))
        used += len(piece.tokens)
      yield from ready()
    close_row()
    yield from ready()
    for N in list(queues):
      for start in range(0, len(queues[N]), self.rows_per_batch(N)):
        yield from run(N, queues[N][start : start + self.rows_per_batch(N)])

  def _finish(self, doc: _Pending) -> DocScore:
    parts = [doc.parts[i] for i in range(len(doc.parts))]
    nll = np.concatenate([p[0] for p in parts]).astype(np.float64)
    ent = np.concatenate([p[1] for p in parts])
    return DocScore(
        index=doc.index,
        id=doc.id,
        n_bytes=int(nll.size),
        nll_nats=float(nll.sum()),
        n_patches=sum(p[2] for p in parts),
        nll_per_byte=nll.astype(np.float32) if self.per_byte else None,
        entropies=ent if self.per_byte and self.model.entropy_config is not None else None,
        greedy_per_byte=np.concatenate([p[3] for p in parts]) if self.per_byte_argmax else None,
    )

  # -------------------------------------------------------------------------------------------------------------
  # Python API.

  def score_arrays(self, token_rows: Sequence[np.ndarray], ids: Optional[Sequence[str]] = None) -> List[DocScore]:
    """Scores `[BOS] bytes (+ [EOS])` id arrays (one per document); results in input order."""
    ids = [str(i) for i in range(len(token_rows))] if ids is None else list(ids)
    results = {s.index: s for s in self.score_stream((i, ids[i], t) for i, t in enumerate(token_rows))}
    return [results[i] for i in range(len(token_rows))]

  def score_texts(self, texts: Sequence[Union[str, bytes]], ids: Optional[Sequence[str]] = None) -> List[DocScore]:
    """Scores texts (str as UTF-8, bytes as they are) under the convention above; results in input order."""
    return self.score_arrays(
        [score_inputs.tokens_of(t if isinstance(t, bytes) else t.encode("utf-8"), self.with_eos) for t in texts], ids
    )


def main(argv=None) -> int:
  from blt_jax import score_cli  # pylint: disable=g-import-not-at-top

  return score_cli.main(argv)


if __name__ == "__main__":
  raise SystemExit(main())
