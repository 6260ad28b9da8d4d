"""Patching against reference fixtures, golden data and hand-worked cases."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blt_jax import patching
from blt_jax import tokenizer

FIXTURE_THRESHOLD = 1.335442066192627


def _lengths_from_starts(starts_T):
  """Pure-Python lengths of a start mask (oracle)."""
  idx = [i for i, s in enumerate(starts_T) if s] + [len(starts_T)]
  return [b - a for a, b in zip(idx[:-1], idx[1:])]


def _split_large(lengths, m):
  """Pure-Python spec 3.5 split: m, m, ..., remainder (oracle)."""
  out = []
  for n in lengths:
    while n > m:
      out.append(m)
      n -= m
    out.append(n)
  return out


def _trim(lengths_BP):
  """Drops trailing columns that are zero in every row (spec 3.5 step 2)."""
  lengths_BP = np.asarray(lengths_BP)
  nonzero_cols = np.flatnonzero(lengths_BP.any(axis=0))
  return lengths_BP[:, : nonzero_cols[-1] + 1]


def _as_np(x):
  return np.asarray(x).tolist()


# --------------------------------------------------------------------------
# Reference fixture and golden data.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def entropy_fixture(fixtures_dir):
  data = json.loads((fixtures_dir / "tokens_with_entropies.json").read_text())
  keys = [str(i) for i in range(len(data["position"]))]
  return {
      "tokens": np.asarray([data["token_ids"][k] for k in keys]),
      "entropies": np.asarray([data["entropies"][k] for k in keys], np.float32),
      "start": np.asarray([data["start"][k] for k in keys], bool),
      "patch": np.asarray([data["patch"][k] for k in keys]),
  }


def test_fixture_tokens_are_bos_text_eos(entropy_fixture, golden):
  # "<" and ">" in the fixture's token strings are BOS and EOS.
  _, meta = golden
  expected = tokenizer.encode(meta["texts"][0])
  np.testing.assert_array_equal(entropy_fixture["tokens"], expected)


@pytest.mark.parametrize("include_next_token", [False, True])
def test_fixture_starts(entropy_fixture, include_next_token):
  # The fixture has one row per token (81 = BOS + 79 bytes + EOS) and start
  # flags for those 81 positions only, i.e. it was made like a preprocessed
  # document (include_next_token=False, lengths sum to 81). Positions 0..80 do
  # not depend on the flag; with True the extra position 81 is decided by
  # e[80] = 4.6e-5 and does not start.
  entropies_1N = jnp.asarray(entropy_fixture["entropies"][None])
  starts_1T = patching.entropy_starts(entropies_1N, FIXTURE_THRESHOLD, include_next_token=include_next_token)
  starts_T = np.asarray(starts_1T)[0]
  assert starts_T.shape == (81 + include_next_token,)
  np.testing.assert_array_equal(starts_T[:81], entropy_fixture["start"])
  if include_next_token:
    assert not starts_T[81]
  np.testing.assert_array_equal(np.cumsum(starts_T[:81]) - 1, entropy_fixture["patch"])
  # Spec 3.3 verified example: e[1]=2.166 starts 2, e[5]=0.040 does not start 6.
  assert starts_T[2] and not starts_T[6]


def test_fixture_bf16_threshold_quirk(entropy_fixture):
  # Quirk Q4: realtime patching compares bf16(e) > bf16(threshold)=1.3359375.
  # e[58]=1.33707 starts position 59 in fp32 but rounds to 1.3359375 in bf16.
  entropies_1N = jnp.asarray(entropy_fixture["entropies"][None])
  starts_bf16 = np.asarray(patching.entropy_starts(entropies_1N, FIXTURE_THRESHOLD, compare_dtype=jnp.bfloat16))[0, :81]
  diff = np.flatnonzero(starts_bf16 != entropy_fixture["start"])
  assert diff.tolist() == [59]
  assert entropy_fixture["start"][59]


@pytest.mark.parametrize(
    "include_next_token, key",
    [(True, "patch_lengths_include_next"), (False, "patch_lengths_no_next")],
)
def test_golden_patch_lengths(golden, include_next_token, key):
  arrays, meta = golden
  expected_BP = arrays[key]
  num_tokens = arrays["tokens"].shape[1]
  # Extra columns only add zero padding (checked once, to save compiles).
  all_max_patches = (39, 64) if include_next_token else (39,)
  for max_patches in all_max_patches:
    patches = patching.patch(
        jnp.asarray(arrays["tokens"]),
        jnp.asarray(arrays["entropies"]),
        mode="entropy",
        threshold=meta["threshold"],
        include_next_token=include_next_token,
        max_patches=max_patches,
    )
    lengths_BP = np.asarray(patches.patch_lengths_BP)
    assert lengths_BP.dtype == np.int32
    assert lengths_BP.shape == (2, max_patches)
    np.testing.assert_array_equal(_trim(lengths_BP), _trim(expected_BP))
    assert not np.asarray(patches.overflow_B).any()
    np.testing.assert_array_equal(patches.num_patches_B, (expected_BP > 0).sum(axis=1))
    np.testing.assert_array_equal(lengths_BP.sum(axis=1), num_tokens + include_next_token)
    # The ids of the start mask agree with ids derived from the lengths.
    np.testing.assert_array_equal(np.asarray(patches.patch_ids_BT)[:, :num_tokens], arrays["patch_ids"])


def test_golden_patch_ids(golden):
  arrays, _ = golden
  lengths_BP = jnp.asarray(arrays["patch_lengths_include_next"])
  num_tokens = arrays["tokens"].shape[1]
  ids_BN = patching.patch_ids_from_lengths(lengths_BP, num_tokens)
  np.testing.assert_array_equal(ids_BN, arrays["patch_ids"])
  np.testing.assert_array_equal(patching.decoder_patch_ids(lengths_BP, num_tokens), arrays["decoder_patch_ids"])


# --------------------------------------------------------------------------
# patch ids from lengths (spec 10.2).
# --------------------------------------------------------------------------


def test_spec_patch_ids_example():
  lengths_BP = jnp.asarray([[1, 3, 2, 4, 0, 0]])
  assert _as_np(patching.patch_ids_from_lengths(lengths_BP, 9)) == [[0, 1, 1, 1, 2, 2, 3, 3, 3]]
  assert _as_np(patching.decoder_patch_ids(lengths_BP, 9)) == [[0, 0, 0, 1, 1, 2, 2, 2, 2]]


def test_patch_ids_uncovered_positions_get_p():
  # Positions past sum(lengths) get P (out of range), as in the reference.
  lengths_BP = jnp.asarray([[1, 2, 0, 0, 0, 0], [2, 2, 2, 2, 2, 2]])
  assert _as_np(patching.patch_ids_from_lengths(lengths_BP, 9)) == [
      [0, 1, 1, 6, 6, 6, 6, 6, 6],
      [0, 0, 1, 1, 2, 2, 3, 3, 4],
  ]


def test_patch_ids_match_counting_definition():
  rng = np.random.default_rng(0)
  lengths_BP = rng.integers(0, 4, size=(3, 12))
  lengths_BP[:, 0] = 1
  num_positions = 20
  bounds_BC = np.concatenate([np.zeros((3, 1), int), np.cumsum(lengths_BP, axis=1)], axis=1)
  j = np.arange(num_positions)
  expected = (bounds_BC[:, None, :] <= j[None, :, None]).sum(-1) - 1
  np.testing.assert_array_equal(patching.patch_ids_from_lengths(jnp.asarray(lengths_BP), num_positions), expected)


# --------------------------------------------------------------------------
# Entropy-mode rules (spec 3.3).
# --------------------------------------------------------------------------


def test_entropy_default_rule():
  e_1N = jnp.asarray([[9.0, 0.5, 3.0, 1.0, 2.5]])
  # p>=2 starts iff e[p-1] > 2: p=2 (0.5) no, p=3 (3.0) yes, p=4 no, p=5 yes.
  assert _as_np(patching.entropy_starts(e_1N, 2.0)) == [[True, True, False, True, False, True]]
  starts = patching.entropy_starts(e_1N, 2.0, include_next_token=False)
  assert _as_np(starts) == [[True, True, False, True, False]]


def test_entropy_monotonicity():
  e_1N = jnp.asarray([[0.0, 1.0, 5.0, 2.0, 4.0, 9.0]])
  # p=2 always (Q13); then e[p-1]-e[p-2] > 1.5: +4 yes, -3 no, +2 yes, +5 yes.
  starts = patching.entropy_starts(e_1N, 1.5, monotonicity=True)
  assert _as_np(starts) == [[True, True, True, True, False, True, True]]
  # Monotonicity wins over threshold_add, as in the reference.
  starts_both = patching.entropy_starts(e_1N, 1.5, threshold_add=100.0, monotonicity=True)
  assert _as_np(starts_both) == _as_np(starts)


def test_entropy_threshold_add():
  e_1N = jnp.asarray([[0.0, 0.0, 10.0, 12.0, 12.0, 20.0, 1.0]])
  # p=2 always, p=3 never (Q13) although e[2]=10 would pass both tests;
  # p>=4: e[p-1]-e[p-2] > 1 and e[p-1] > 2.
  starts = patching.entropy_starts(e_1N, 2.0, threshold_add=1.0)
  assert _as_np(starts) == [[True, True, True, False, True, False, True, False]]


def test_entropy_short_inputs():
  # One token with the next position: [BOS] then the next token.
  assert _as_np(patching.entropy_starts(jnp.zeros((1, 1)), 1.0)) == [[True, True]]
  assert _as_np(patching.entropy_starts(jnp.zeros((1, 1)), 1.0, include_next_token=False)) == [[True]]


# --------------------------------------------------------------------------
# Other modes (spec 3.4).
# --------------------------------------------------------------------------


def _tokens(text, add_eos=False):
  return jnp.asarray(tokenizer.encode(text, add_eos=add_eos)[None])


def test_space_hello_world():
  tokens_1N = _tokens("Hello world")
  starts_T = np.asarray(patching.space_starts(tokens_1N))[0]
  # [BOS] [Hello ] [world + next token]
  assert _lengths_from_starts(starts_T) == [1, 6, 6]
  starts_T = np.asarray(patching.space_starts(tokens_1N, include_next_token=False))[0]
  assert _lengths_from_starts(starts_T) == [1, 6, 5]


def test_space_runs_digits_and_utf8():
  # BOS a 1 , ' ' C3 A9 ' ' ' ' b: "," ends a patch, the following space
  # and the lead byte C3 continue the run, A9 (continuation) is not
  # space-like, the first of the next two spaces ends a patch.
  tokens_1N = _tokens("a1, é  b")
  starts = np.asarray(patching.space_starts(tokens_1N))[0]
  assert np.flatnonzero(starts).tolist() == [0, 1, 4, 8]
  # A UTF-8 lead byte after a letter is space-like and ends the patch.
  starts = np.asarray(patching.space_starts(_tokens("aé")))[0]
  assert np.flatnonzero(starts).tolist() == [0, 1, 3]
  # Special ids always count, even right after a space-like byte.
  tokens_1N = jnp.asarray([[tokenizer.BOS_ID, 36, tokenizer.EOS_ID]])
  starts = np.asarray(patching.space_starts(tokens_1N))[0]
  assert np.flatnonzero(starts).tolist() == [0, 1, 3]


def test_space_like_byte_classes():
  b = np.arange(256)
  tokens_BN = np.stack([np.full(256, tokenizer.BOS_ID), np.full(256, ord("a") + 4), b + 4], axis=1)
  starts_BT = np.asarray(patching.space_starts(jnp.asarray(tokens_BN)))
  alnum = np.array([chr(x).isascii() and chr(x).isalnum() for x in b])
  continuation = (b >= 0x80) & (b < 0xC0)
  np.testing.assert_array_equal(starts_BT[:, 3], ~alnum & ~continuation)


def test_static_and_byte():
  def lengths(**kw):
    starts_BT = np.asarray(patching.static_starts(2, 10, 4, **kw))
    assert (starts_BT == starts_BT[:1]).all()
    return _lengths_from_starts(starts_BT[0])

  assert lengths() == [1, 3, 4, 3]
  assert lengths(first_patch_single_byte=False) == [4, 4, 3]
  assert lengths(include_next_token=False) == [1, 3, 4, 2]
  assert lengths(include_next_token=False, first_patch_single_byte=False) == [4, 4, 2]
  starts_BT = patching.byte_starts(2, 10, include_next_token=False)
  assert starts_BT.shape == (2, 10) and bool(starts_BT.all())
  with pytest.raises(ValueError, match="int patch_size"):
    patching.patch(jnp.zeros((1, 4), jnp.int32), mode="static", patch_size=4.5)


def test_bad_modes():
  tokens_1N = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match=r"'bpe'.*entropy.*space.*static.*byte"):
    patching.patch(tokens_1N, mode="bpe")
  with pytest.raises(ValueError, match="needs entropies"):
    patching.patch(tokens_1N, None, mode="entropy")


# --------------------------------------------------------------------------
# max_patch_length (spec 3.5) and overflow.
# --------------------------------------------------------------------------


def test_limit_patch_length_hand_example():
  starts_1T = jnp.asarray([[1, 1, 0, 0, 0, 0, 0, 1, 0, 0]], bool)  # [1, 6, 3]
  limited = patching.limit_patch_length(starts_1T, 2)
  assert _lengths_from_starts(np.asarray(limited)[0]) == [1, 2, 2, 2, 2, 1]
  limited = patching.limit_patch_length(starts_1T, 4)
  assert _lengths_from_starts(np.asarray(limited)[0]) == [1, 4, 2, 3]
  np.testing.assert_array_equal(patching.limit_patch_length(starts_1T, None), starts_1T)


@pytest.mark.parametrize("max_patch_length", [1, 4])
def test_limit_patch_length_on_golden(golden, max_patch_length):
  arrays, meta = golden
  starts_BT = patching.entropy_starts(jnp.asarray(arrays["entropies"]), meta["threshold"])
  limited_BT = np.asarray(patching.limit_patch_length(starts_BT, max_patch_length))
  golden_BP = arrays["patch_lengths_include_next"]
  for row_T, expected_row in zip(limited_BT, golden_BP):
    lengths = _lengths_from_starts(row_T)
    assert max(lengths) <= max_patch_length and sum(lengths) == 82
    expected = _split_large([int(n) for n in expected_row if n], max_patch_length)
    assert lengths == expected


def test_overflow_keeps_every_byte(golden):
  arrays, meta = golden
  max_patches = 10
  patches = patching.patch(
      jnp.asarray(arrays["tokens"]),
      jnp.asarray(arrays["entropies"]),
      threshold=meta["threshold"],
      max_patches=max_patches,
  )
  lengths_BP = np.asarray(patches.patch_lengths_BP)
  ids_BT = np.asarray(patches.patch_ids_BT)
  expected_BP = arrays["patch_lengths_include_next"]
  assert np.asarray(patches.overflow_B).all()
  np.testing.assert_array_equal(patches.num_patches_B, [max_patches] * 2)
  np.testing.assert_array_equal(lengths_BP.sum(axis=1), [82, 82])
  assert ids_BT.max() < max_patches and ids_BT.shape == (2, 82)
  # Representable patches are untouched; the rest merges into the last one.
  np.testing.assert_array_equal(lengths_BP[:, :-1], expected_BP[:, :9])
  np.testing.assert_array_equal(lengths_BP[:, -1], 82 - expected_BP[:, :9].sum(axis=1))


def test_overflow_flag_per_row():
  starts_BT = jnp.asarray([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], bool)
  patches = patching.starts_to_patches(starts_BT, max_patches=3)
  assert _as_np(patches.overflow_B) == [True, False]
  assert _as_np(patches.patch_lengths_BP) == [[1, 1, 4], [1, 5, 0]]
  assert _as_np(patches.patch_ids_BT) == [[0, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1]]
  assert _as_np(patches.num_patches_B) == [3, 2]


# --------------------------------------------------------------------------
# jit, fixed shapes and causality.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", patching.MODES)
def test_jit_no_recompilation(golden, mode):
  arrays, meta = golden
  num_traces = 0

  def run(tokens_BN, entropies_BN):
    nonlocal num_traces
    num_traces += 1  # Python side effect: runs only while tracing.
    return patching.patch(
        tokens_BN,
        entropies_BN,
        mode=mode,
        threshold=meta["threshold"],
        patch_size=4,
        max_patch_length=6,
        max_patches=82,
    )

  run_jit = jax.jit(run)
  tokens_BN = jnp.asarray(arrays["tokens"], jnp.int32)
  entropies_BN = jnp.asarray(arrays["entropies"])
  first = run_jit(tokens_BN, entropies_BN)
  second = run_jit(tokens_BN[::-1], entropies_BN[::-1] * 0.5)
  assert num_traces == 1
  for patches in (first, second):
    assert patches.patch_lengths_BP.shape == (2, 82)
    assert not patches.overflow_B.any()
    np.testing.assert_array_equal(patches.patch_lengths_BP.sum(axis=1), 82)
    assert int(patches.patch_lengths_BP.max()) <= 6
  if mode == "entropy":
    for row, expected_row in zip(np.asarray(first.patch_lengths_BP), arrays["patch_lengths_include_next"]):
      expected = _split_large([int(n) for n in expected_row if n], 6)
      assert row[row > 0].tolist() == expected


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"monotonicity": True}, {"threshold_add": 0.1}, {"max_patch_length": 3}],
)
def test_entropy_causality(kwargs):
  # Row t+1 perturbs e[t]; row 0 is the unperturbed input. Starts at
  # positions <= t must not change.
  num_tokens = 24
  rng = np.random.default_rng(1)
  base_N = rng.uniform(0.0, 3.0, size=num_tokens).astype(np.float32)
  rows_BN = np.tile(base_N, (num_tokens + 1, 1))
  t = np.arange(num_tokens)
  rows_BN[t + 1, t] = np.where(base_N > 1.5, 0.0, 3.0)  # Flip every test.
  kwargs = dict(kwargs)  # Do not mutate the shared parameter.
  max_patch_length = kwargs.pop("max_patch_length", None)
  starts_BT = patching.entropy_starts(jnp.asarray(rows_BN), 1.5, **kwargs)
  starts_BT = np.asarray(patching.limit_patch_length(starts_BT, max_patch_length))
  for t in range(num_tokens):
    np.testing.assert_array_equal(starts_BT[t + 1, : t + 1], starts_BT[0, : t + 1])
  if not kwargs and max_patch_length is None:
    # Default rule: e[t] decides position t+1 and nothing else.
    changed_BT = starts_BT[1:] != starts_BT[:1]
    for t in range(num_tokens):
      expected = [t + 1] if t >= 1 else []  # Position 1 always starts.
      assert np.flatnonzero(changed_BT[t]).tolist() == expected


def test_space_causality():
  text_ids = tokenizer.encode("ab, c  d/e1 x\u00e9y", add_eos=False)
  num_tokens = len(text_ids)
  # Row t+1 swaps a space-like and a letter byte at position t; row 0 is
  # the unperturbed input.
  rows_BN = np.tile(text_ids, (num_tokens + 1, 1))
  t = np.arange(num_tokens)
  rows_BN[t + 1, t] = np.where(text_ids == ord("q") + 4, ord(" ") + 4, ord("q") + 4)
  starts_BT = np.asarray(patching.space_starts(jnp.asarray(rows_BN)))
  base_T = starts_BT[0]
  for t in range(num_tokens):
    np.testing.assert_array_equal(starts_BT[t + 1, : t + 1], base_T[: t + 1])
    # Token t only affects starts t+1 and t+2.
    np.testing.assert_array_equal(starts_BT[t + 1, t + 3 :], base_T[t + 3 :])


def test_lengths_and_ids_match_the_counting_definition():
  """`starts_to_patches` and `patch_ids_from_lengths` (binary searches) against the obvious per-position counts:
  overflow merged into the last slot, zero-length patches, positions past the lengths' sum."""
  rng = np.random.default_rng(0)
  for _ in range(100):
    batch, positions = 3, int(rng.integers(2, 60))
    slots = int(rng.integers(1, positions + 3))
    starts = rng.random((batch, positions)) < rng.random()
    got = patching.starts_to_patches(jnp.asarray(starts), slots)
    starts[:, 0] = True
    ids = np.minimum(np.cumsum(starts, axis=1) - 1, slots - 1)
    lengths = np.stack([np.bincount(row, minlength=slots) for row in ids])
    np.testing.assert_array_equal(got.patch_ids_BT, ids)
    np.testing.assert_array_equal(got.patch_lengths_BP, lengths)
    lengths = rng.integers(0, 5, (batch, slots))
    num = int(rng.integers(1, 3 * slots + 2))
    bounds = np.concatenate([np.zeros((batch, 1), int), np.cumsum(lengths, axis=1)], axis=1)
    expected = np.array([[np.sum(bounds[b] <= j) - 1 for j in range(num)] for b in range(batch)])
    np.testing.assert_array_equal(patching.patch_ids_from_lengths(jnp.asarray(lengths), num), expected)
