"""Config-driven train/eval loaders built from grain datasets.

Train: this host's token share of the training documents (`build_train_source`:
contiguous shares of equal tokens, give or take one document, so every host
reads its documents equally often) -> seeded shuffle -> repeat forever ->
encode `[BOS] bytes [EOS]` -> pack into windows -> batch -> thread prefetch.
The resulting grain iterator is checkpointable (`get_state`/`set_state`).

Eval: all validation documents -> per-host stride -> encode -> pack (final
window padded) -> batch; a fixed number of fixed-shape batches, identical on
every host (every host counts every host's windows to agree on it).

Batches are dicts of numpy arrays of shape [B_host, seq_len]:
  tokens     int32    input ids
  targets    int32    next-token ids (tokens shifted by one in the stream)
  loss_mask  float32  1 for real targets, 0 for padding (eval only)
  <extra>    float32  per-token arrays a source provides, e.g. `entropies`
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from blt_jax import tokenizer
from blt_jax.data import entropy_source
from blt_jax.data import packing
from blt_jax.data import sources as sources_lib

log = logging.getLogger(__name__)
# Warnings already logged by this process (the train and eval sources both
# decide the split; it is said once).
_warned: set[str] = set()


def default_data_config() -> ml_collections.ConfigDict:
  """Data settings read by `make_train_iterator` / `make_eval_iterator`."""
  cfg = ml_collections.ConfigDict()
  # Training data: paths and/or glob patterns of .txt (one document per file),
  # .jsonl (one per line), .parquet / .arrow / .feather (one per row).
  # Empty: the running Python's standard library sources (no download).
  cfg.sources = []
  # jsonl field, or parquet/arrow column, that holds the document text.
  cfg.text_field = "text"
  # Validation data, same forms as `sources`. Empty: a hash-based split of
  # the training documents with `validation_fraction` held out.
  cfg.validation_sources = []
  # Fraction of documents held out for validation when `validation_sources`
  # is empty (decided per document by a stable hash of its path/line key).
  # 0 with no `validation_sources`: no validation data, no evaluation. A
  # positive fraction holds out at least one document (a small corpus: the one
  # whose key hashes lowest, with a warning); one document cannot be split.
  cfg.validation_fraction = 0.02
  # Stdlib corpus only: also read the test suites (test/, tests/, idle_test/).
  cfg.stdlib_include_tests = False
  # Document shuffle seed; None uses the `seed` passed to make_train_iterator.
  cfg.shuffle_seed = None
  # Threads that read and encode documents (grain ReadOptions.num_threads).
  cfg.num_threads = 4
  # Documents read ahead by those threads (ReadOptions.prefetch_buffer_size).
  cfg.read_buffer_size = 64
  # Batches prepared ahead in a background thread (0 disables).
  cfg.prefetch = 2
  # Cap on eval batches per evaluation; None or <= 0 means a full pass.
  cfg.max_eval_batches = None
  # A record without document text (invalid JSON, a missing or non-string
  # field, a null parquet/arrow value): "error" stops at start-up naming its
  # file:line; "skip" leaves it out, and the count and the first few are
  # logged (web-scale corpora always have some).
  cfg.on_bad_record = "error"
  # Directory written by scripts/precompute_entropies.py: batches then carry
  # per-token `entropies` and entropy patching skips the in-graph entropy model.
  cfg.entropy_store = ""
  return cfg


def _resolve_host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"invalid host shard: process_index={process_index}," f" process_count={process_count}")
  return int(process_index), int(process_count)


def _per_host_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} must be a positive multiple" f" of process_count={process_count}"
    )
  return global_batch_size // process_count


def _as_list(value: Any) -> list[str]:
  if value is None:
    return []
  if isinstance(value, str):
    return [value] if value else []
  return list(value)


def _get(cfg: ml_collections.ConfigDict, name: str) -> Any:
  """Reads a field, falling back to the default for configs that omit it."""
  if name in cfg:
    return cfg[name]
  return default_data_config()[name]


def build_sources(
    data_cfg: ml_collections.ConfigDict,
) -> tuple[sources_lib.DocumentSource, sources_lib.DocumentSource]:
  """The (train, validation) sources a data config describes (with stored entropies if configured)."""
  train, val = build_document_sources(data_cfg)
  return _annotate(train, data_cfg), _annotate(val, data_cfg)


def _annotate(source: Any, data_cfg: ml_collections.ConfigDict) -> Any:
  store = _get(data_cfg, "entropy_store")
  if not store:
    return source
  _check_keys_across(data_cfg)
  return entropy_source.EntropyAnnotatedSource(source, store)


def _check_keys_across(data_cfg: ml_collections.ConfigDict) -> None:
  """Fails on a training and a validation file with one key.

  Only where they share an entropy store, which finds documents by key: apart
  (the split is by key within `sources` only), `train/part-0.jsonl` and
  `val/part-0.jsonl` are fine. Keys within each are always unique
  (`sources.list_files`).
  """
  val_patterns = _as_list(_get(data_cfg, "validation_sources"))
  if val_patterns:
    sources_lib.list_files(_as_list(_get(data_cfg, "sources")) + val_patterns)


def _corpus(data_cfg: ml_collections.ConfigDict, shard: tuple[int, int] = (0, 1)) -> sources_lib.DocumentSource:
  """The training corpus (`sources`, else the stdlib), or a process's share."""
  patterns = _as_list(_get(data_cfg, "sources"))
  if patterns:
    return sources_lib.file_corpus(
        patterns,
        _get(data_cfg, "text_field"),
        name="sources",
        shard=shard,
        on_bad_record=_get(data_cfg, "on_bad_record"),
    )
  return sources_lib.stdlib_corpus(_get(data_cfg, "stdlib_include_tests"), shard=shard)


def _validation_fraction(data_cfg: ml_collections.ConfigDict) -> float:
  fraction = float(_get(data_cfg, "validation_fraction"))
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"validation_fraction must be in [0, 1), got {fraction}")
  return fraction


def has_validation(data_cfg: ml_collections.ConfigDict) -> bool:
  """Whether the config holds out validation data (else evaluation is off)."""
  return bool(_as_list(_get(data_cfg, "validation_sources"))) or bool(_validation_fraction(data_cfg))


def build_document_sources(
    data_cfg: ml_collections.ConfigDict, for_store: bool = False
) -> tuple[sources_lib.DocumentSource, sources_lib.DocumentSource]:
  """The (train, validation) document sources (raw bytes) a data config describes.

  `for_store`: both go into one entropy store, so a training and a validation
  file with the same key are an error (see `_check_keys_across`).
  """
  docs = _corpus(data_cfg)
  val_patterns = _as_list(_get(data_cfg, "validation_sources"))
  if val_patterns:
    if for_store:
      _check_keys_across(data_cfg)
    val = sources_lib.file_corpus(
        val_patterns,
        _get(data_cfg, "text_field"),
        name="validation_sources",
        on_bad_record=_get(data_cfg, "on_bad_record"),
    )
    _report_bad_records("data.sources", docs.bad_records())
    _report_bad_records("data.validation_sources", val.bad_records())
    return docs, val
  fraction = _validation_fraction(data_cfg)
  _report_bad_records("data.sources", docs.bad_records())
  hashes = docs.key_hashes()
  threshold = _split_threshold(fraction, [_hash_summary(hashes, fraction)])
  train, val = docs.split_by_hash(threshold, hashes)
  if not len(train):
    raise ValueError(
        f"no training documents left after holding out validation_fraction=" f"{fraction} of {len(docs)} documents"
    )
  return train, val


def _hash_summary(hashes: Sequence[int], fraction: float) -> list[int]:
  """[documents, those the fraction holds out, smallest key hash] of a corpus
  or one of its shares: what `_split_threshold` needs of each."""
  cut = fraction * 2.0**64
  return [len(hashes), sum(h < cut for h in hashes), min(hashes, default=0)]


def _report_bad_records(what: str, bad: sources_lib.BadRecords, total: int | None = None) -> None:
  """Logs the records skipped in `what` (`total` over all processes' shares
  when known; `bad` names the first few of this one's)."""
  total = bad.count if total is None else total
  if total:
    first = f"; the first: {'; '.join(bad.examples)}" if bad.examples else ""
    _warn_once(f"{what}: skipped {total} bad record(s) (data.on_bad_record='skip')" + first)


def _split_threshold(fraction: float, summaries: Sequence[list[int]]) -> float:
  """The key hash below which documents are held out for validation.

  `fraction * 2**64`, unless that holds out none of a corpus's documents (a
  small one): then the one whose key hashes lowest is held out, so a positive
  fraction always evaluates. A corpus of one document cannot be split.
  """
  cut = fraction * 2.0**64
  total = sum(s[0] for s in summaries)
  if not fraction:
    return cut
  if total == 1:
    raise ValueError(_ONE_DOCUMENT)
  if not total or sum(s[1] for s in summaries):
    return cut
  _warn_once(
      f"validation_fraction={fraction} holds out none of the {total} training"
      " documents: holding out 1 document for validation (set"
      " data.validation_sources to choose them)"
  )
  return min(s[2] for s in summaries if s[0]) + 1


_ONE_DOCUMENT = (
    "data.sources holds 1 document, which cannot be both trained on and held"
    " out: add documents, set data.validation_sources, or set"
    " data.validation_fraction=0 to train without evaluation"
)


def _warn_once(message: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  if message not in _warned and jax.process_index() == 0:
    _warned.add(message)
    log.warning(message)


def _share_summary(
    data_cfg: ml_collections.ConfigDict, docs: sources_lib.DocumentSource
) -> tuple[list[int], list[int]]:
  """(summary, key hashes) of a byte share before the split: its
  `_hash_summary` (if split by hash) and its bad records."""
  fraction = _validation_fraction(data_cfg)
  hashes = []
  if fraction and not _as_list(_get(data_cfg, "validation_sources")):
    hashes = docs.key_hashes()
  return _hash_summary(hashes, fraction) + [docs.bad_records().count], hashes


def _share_summaries(
    data_cfg: ml_collections.ConfigDict,
    own: list[int],
    index: int,
    count: int,
) -> list[list[int]]:
  """`_share_summary` of every byte share, given this process's (`own`).

  One all-gather over the processes (as in `_share_tokens`); processes
  simulated in one read every share here.
  """
  import jax  # pylint: disable=g-import-not-at-top

  summaries = {index: own}
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    # Each number as four 16-bit pieces: int32 carries them whole.
    mine = [index] + [(v >> (16 * j)) & 0xFFFF for v in own for j in range(4)]
    rows = np.asarray(multihost_utils.process_allgather(np.array(mine, np.int32))).reshape(-1, len(mine))
    for row in rows.tolist():
      summaries[row[0]] = [sum(row[1 + 4 * v + j] << (16 * j) for j in range(4)) for v in range(len(own))]
  for k in range(count):
    if k not in summaries:
      summaries[k] = _share_summary(data_cfg, _corpus(data_cfg, (k, count)))[0]
  return [summaries[k] for k in range(count)]


def _train_documents(
    data_cfg: ml_collections.ConfigDict, index: int, count: int
) -> tuple[sources_lib.DocumentSource, float | None, int]:
  """(training documents of byte share `index` of `count`, the split's
  threshold for the other shares (`_byte_share`), bad records skipped in all
  shares): the threshold and the count need every share's summary."""
  docs = _corpus(data_cfg, (index, count))
  own, hashes = _share_summary(data_cfg, docs)
  fraction = _validation_fraction(data_cfg)
  by_hash = not _as_list(_get(data_cfg, "validation_sources"))
  summaries = [own]
  skipping = _get(data_cfg, "on_bad_record") == "skip"
  if count > 1 and (by_hash and fraction or skipping):  # same on every process
    summaries = _share_summaries(data_cfg, own, index, count)
  bad = sum(s[3] for s in summaries)
  _report_bad_records("data.sources", docs.bad_records(), bad)
  threshold = None
  if by_hash and fraction:
    threshold = _split_threshold(fraction, summaries)
    docs, _ = docs.split_by_hash(threshold, hashes)
  return docs, threshold, bad


def _byte_share(
    data_cfg: ml_collections.ConfigDict,
    index: int,
    count: int,
    threshold: float | None,
) -> sources_lib.DocumentSource:
  """The training documents that start in share `index` of `count` of the
  corpus's bytes (see `sources`): only those bytes are read. `threshold`:
  the split's (`_train_documents`), None without a hash split."""
  docs = _corpus(data_cfg, (index, count))
  if threshold is not None:
    docs, _ = docs.split_by_hash(threshold)
  return docs


def _share_tokens(
    data_cfg: ml_collections.ConfigDict,
    own: int,
    index: int,
    count: int,
    threshold: float | None,
) -> list[int]:
  """Training tokens in every byte share, given this process's (`own`).

  One all-gather over the processes (those with one data index hold the same
  share); processes simulated in one (tests, tools) count every share here.
  """
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    # int32 halves: jax without x64 would truncate a count over 2**31.
    mine = np.array([index, own >> 31, own & (2**31 - 1)], np.int32)
    rows = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 3)
    tokens = {int(k): (int(h) << 31) | int(l) for k, h, l in rows}
    if sorted(tokens) == list(range(count)):
      return [tokens[k] for k in range(count)]
  return [
      own if k == index else int(_byte_share(data_cfg, k, count, threshold).token_counts().sum()) for k in range(count)
  ]


def _token_share(
    data_cfg: ml_collections.ConfigDict,
    own: sources_lib.DocumentSource,
    index: int,
    count: int,
    threshold: float | None,
) -> sources_lib.DocumentSource:
  """The training documents whose first token is in tokens [i*T/n, (i+1)*T/n).

  T counts the training tokens of the whole corpus in its sorted order; the
  byte shares this range overlaps are read (its own and, typically, a
  neighbour's). A range inside one document (longer than T/n) gets that one.
  """
  tokens = _share_tokens(data_cfg, int(own.token_counts().sum()), index, count, threshold)
  share_starts = np.cumsum([0] + tokens)
  lo, hi = sources_lib.shard_bounds(int(share_starts[-1]), (index, count))
  pieces, covering = [], None
  for k in range(count):
    first, end = share_starts[k], share_starts[k + 1]
    if first == end or end <= lo or first >= hi:
      continue
    docs = own if k == index else _byte_share(data_cfg, k, count, threshold)
    counts = docs.token_counts()
    starts = first + np.cumsum(counts) - counts
    pieces.append(docs.select(np.flatnonzero((starts >= lo) & (starts < hi)), docs.name))
    if first <= lo < end:  # The document holding token lo.
      covering = docs.select([int(np.searchsorted(starts, lo, side="right")) - 1], docs.name)
  name = f"{own.name}[tokens {index} of {count}]"
  share = sources_lib.concat(pieces, name)
  if not len(share) and covering is not None:
    share = sources_lib.concat([covering], name)
  return share


def build_train_source(
    data_cfg: ml_collections.ConfigDict,
    process_index: int = 0,
    process_count: int = 1,
) -> sources_lib.DocumentSource:
  """This process's training documents: its token share of the training split.

  With several processes, the training documents in the corpus's sorted
  order are cut into contiguous shares of equal tokens (`_token_share`):
  each process reads its 1/n of the bytes to count its tokens, the processes
  exchange those n counts, and each reads the byte shares its token range
  overlaps. The shares partition the training documents of `build_sources`
  (in order), except that a process whose range lies inside one document
  gets that document too; with one process they are those documents.
  """
  return _build_train_source(data_cfg, process_index, process_count)[0]


def _build_train_source(data_cfg: ml_collections.ConfigDict, process_index: int, process_count: int) -> tuple[Any, int]:
  """(`build_train_source`, the bad records skipped in the whole corpus)."""
  docs, threshold, bad = _train_documents(data_cfg, process_index, process_count)
  if process_count > 1:
    docs = _token_share(data_cfg, docs, process_index, process_count, threshold)
  if not len(docs):
    raise ValueError(
        f"no training documents in the corpus ({docs.name}) for process" f" {process_index} of {process_count}"
    )
  return _annotate(docs, data_cfg), bad


def document_dataset(
    source: Any,
    *,
    seed: int | None,
    shuffle: bool,
    repeat: bool,
    process_index: int,
    process_count: int,
) -> grain.MapDataset:
  """Encoded documents for one host: `{"ids": int32[n], <extra>: ...}`.

  Sharding (by position) comes after shuffle/repeat, so each epoch's shuffled
  documents are dealt to the hosts in turn: disjoint, together the corpus
  (hosts whose documents differ in length reach its end at different steps).
  """
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed)
  if repeat:
    ds = ds.repeat(None)  # Reshuffles each epoch.
  ds = ds[process_index::process_count]
  return ds.map(packing.to_token_doc)


def _stack(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def build_train_dataset(
    source: Any,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    num_threads: int = 4,
    read_buffer_size: int = 64,
    prefetch: int = 2,
    source_is_share: bool = False,
) -> grain.IterDataset:
  """Infinite batches of `batch_size` packed windows for one host.

  `source` is the whole training set, which the hosts stride through after
  the shuffle, or with `source_is_share` this host's own token share of it
  (`build_train_source`), shuffled and repeated on its own.
  """
  if not len(source):
    raise ValueError(f"training source {source!r} has no documents")
  docs = document_dataset(
      source,
      seed=seed,
      shuffle=True,
      repeat=True,
      process_index=0 if source_is_share else process_index,
      process_count=1 if source_is_share else process_count,
  )
  ds = docs.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=read_buffer_size))
  # Restoring a state under a different data setup would silently shift the
  # data position; the packer checks this metadata on set_state.
  metadata = {
      "num_documents": len(source),
      "seed": seed,
      "process_index": process_index,
      "process_count": process_count,
  }
  if process_count > 1:  # (one process reads the same either way)
    metadata["sharding"] = "token_shares" if source_is_share else "strided"
  ds = packing.PackedWindowsIterDataset(ds, seq_len, metadata=metadata)
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=_stack)
  if prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  return ds


def make_train_iterator(
    data_cfg: ml_collections.ConfigDict,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
  """Infinite, checkpointable iterator of this host's training batches.

  Args:
    data_cfg: see `default_data_config` (reads sources, text_field,
      validation_sources, validation_fraction, stdlib_include_tests,
      shuffle_seed, num_threads, read_buffer_size, prefetch).
    seq_len: tokens per row.
    global_batch_size: rows per step over all hosts; must divide evenly.
    seed: shuffle seed unless `data_cfg.shuffle_seed` is set.
    process_index: this host (default `jax.process_index()`).
    process_count: number of hosts (default `jax.process_count()`).

  Returns:
    A grain DatasetIterator of dicts {tokens, targets, loss_mask[, extras]}
    of shape [global_batch_size // process_count, seq_len]. `get_state()`
    returns a JSON-native dict (see `state_to_bytes`) and `set_state(state)`
    resumes at exactly that position. `bad_records`: the records skipped
    in the whole corpus (`on_bad_record="skip"`).
  """
  process_index, process_count = _resolve_host(process_index, process_count)
  batch_size = _per_host_batch_size(global_batch_size, process_count)
  train, bad = _build_train_source(data_cfg, process_index, process_count)
  shuffle_seed = _get(data_cfg, "shuffle_seed")
  ds = build_train_dataset(
      train,
      seq_len=seq_len,
      batch_size=batch_size,
      seed=int(seed if shuffle_seed is None else shuffle_seed),
      process_index=process_index,
      process_count=process_count,
      num_threads=int(_get(data_cfg, "num_threads")),
      read_buffer_size=int(_get(data_cfg, "read_buffer_size")),
      prefetch=int(_get(data_cfg, "prefetch")),
      source_is_share=True,
  )
  it = iter(ds)
  it.bad_records = bad  # for the trainer's metrics
  return it


def _num_tokens(source: Any, i: int) -> int:
  if hasattr(source, "num_tokens"):
    return int(source.num_tokens(i))
  return len(packing.to_token_doc(source[i])[packing.IDS])


def _num_windows(num_tokens: int, seq_len: int) -> int:
  """Windows a padded pass cuts from a stream of `num_tokens` tokens."""
  return 0 if num_tokens < 2 else math.ceil((num_tokens - 1) / seq_len)


class EvalIterator:
  """A finite pass over the validation set in fixed-shape batches.

  Iterating (again) starts a fresh pass. Every host yields `num_batches`
  batches of [batch_size, seq_len], so collective eval steps stay in lock
  step; rows past this host's data are all padding (loss_mask 0).
  `num_real_rows[b]` is how many rows of batch `b` hold real windows.
  """

  def __init__(
      self,
      source: Any,
      *,
      seq_len: int,
      batch_size: int,
      process_index: int,
      process_count: int,
      num_threads: int = 4,
      read_buffer_size: int = 64,
      prefetch: int = 2,
      max_batches: int | None = None,
  ):
    self.source = source
    self.seq_len = seq_len
    self.batch_size = batch_size
    self.process_index = process_index
    self.process_count = process_count
    self._num_threads = num_threads
    self._read_buffer_size = read_buffer_size
    self._prefetch = prefetch
    self.extra_fields = tuple(getattr(source, "extra_fields", ()))
    # Every host counts every host's windows (cheap: file sizes / an index)
    # so all agree on the number of batches without communicating.
    tokens_per_host = [0] * process_count
    for i in range(len(source)):
      tokens_per_host[i % process_count] += _num_tokens(source, i)
    windows = [_num_windows(t, seq_len) for t in tokens_per_host]
    num_batches = max(math.ceil(w / batch_size) for w in windows)
    if max_batches is not None and max_batches > 0:
      num_batches = min(num_batches, max_batches)
    self.num_batches = num_batches
    mine = windows[process_index]
    self.num_real_rows = [int(np.clip(mine - b * batch_size, 0, batch_size)) for b in range(num_batches)]

  def __len__(self) -> int:
    return self.num_batches

  def _padding_rows(self, n: int) -> dict[str, np.ndarray]:
    shape = (n, self.seq_len)
    rows = {
        "tokens": np.full(shape, tokenizer.BOE_ID, np.int32),
        "targets": np.full(shape, tokenizer.BOE_ID, np.int32),
        "loss_mask": np.zeros(shape, np.float32),
    }
    for name in self.extra_fields:
      rows[name] = np.zeros(shape, np.float32)
    return rows

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    docs = document_dataset(
        self.source,
        seed=None,
        shuffle=False,
        repeat=False,
        process_index=self.process_index,
        process_count=self.process_count,
    )
    ds = docs.to_iter_dataset(
        grain.ReadOptions(
            num_threads=self._num_threads,
            prefetch_buffer_size=self._read_buffer_size,
        )
    )
    ds = packing.PackedWindowsIterDataset(ds, self.seq_len, pad_final=True)
    ds = ds.batch(self.batch_size, drop_remainder=False, batch_fn=_stack)
    if self._prefetch > 0:
      ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=self._prefetch)
    it = iter(ds)
    try:
      for b in range(self.num_batches):
        batch = next(it, None) if self.num_real_rows[b] else None
        n = 0 if batch is None else len(batch["tokens"])
        if n != self.num_real_rows[b]:
          raise RuntimeError(
              f"eval batch {b} has {n} windows, expected" f" {self.num_real_rows[b]}; did the validation data change?"
          )
        if n == 0:
          yield self._padding_rows(self.batch_size)
        elif n < self.batch_size:
          pad = self._padding_rows(self.batch_size - n)
          yield {k: np.concatenate([v, pad[k]]) for k, v in batch.items()}
        else:
          yield batch
    finally:
      it.close()


def make_eval_iterator(
    data_cfg: ml_collections.ConfigDict,
    seq_len: int,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalIterator:
  """Re-iterable validation pass for this host (see `EvalIterator`).

  Reads the same fields as `make_train_iterator` plus `max_eval_batches`;
  documents are read in a fixed order (no shuffle).
  """
  process_index, process_count = _resolve_host(process_index, process_count)
  batch_size = _per_host_batch_size(global_batch_size, process_count)
  _, val = build_sources(data_cfg)
  if not len(val):
    raise ValueError("no validation documents: set data.validation_sources or a positive" " data.validation_fraction")
  return EvalIterator(
      val,
      seq_len=seq_len,
      batch_size=batch_size,
      process_index=process_index,
      process_count=process_count,
      num_threads=int(_get(data_cfg, "num_threads")),
      read_buffer_size=int(_get(data_cfg, "read_buffer_size")),
      prefetch=int(_get(data_cfg, "prefetch")),
      max_batches=_get(data_cfg, "max_eval_batches"),
  )


def state_to_bytes(state: dict[str, Any]) -> bytes:
  """Serialises an iterator state (`iterator.get_state()`) as UTF-8 JSON."""
  return json.dumps(state, sort_keys=True, separators=(",", ":")).encode()


def state_from_bytes(data: bytes | str) -> dict[str, Any]:
  """Inverse of `state_to_bytes`; pass the result to `iterator.set_state`."""
  return json.loads(data)
