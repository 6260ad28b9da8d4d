"""blt_jax.study.noise: the five noise types are seeded, rate-faithful, and keep the text valid UTF-8."""

import re
import string

import numpy as np
import pytest

from blt_jax.study import noise

TEXT = (
    "The quick brown fox jumps over the lazy dog. Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 Stra\u00dfe, "
    "\u65e5\u672c\u8a9e\u306e\u6587 and emoji \U0001F600 too.\n\tdef f(x):\n    return x + 1\n"
)
ALL = [n.fn for n in noise.NOISES]


@pytest.mark.parametrize("fn", ALL, ids=[n.name for n in noise.NOISES])
def test_deterministic_per_seed(fn):
  assert fn(TEXT, 0.5, 7) == fn(TEXT, 0.5, 7)
  assert fn(TEXT, 0.5, (3, 1)) == fn(TEXT, 0.5, (3, 1))
  if fn is not noise.caps:  # caps at 0.5 over ~20 words can repeat across two seeds; the others cannot in practice
    assert fn(TEXT * 5, 0.5, 7) != fn(TEXT * 5, 0.5, 8)


@pytest.mark.parametrize("fn", ALL, ids=[n.name for n in noise.NOISES])
def test_rate_zero_is_identity_and_bytes_stay_valid_utf8(fn):
  assert fn(TEXT, 0.0, 1) == TEXT
  assert fn("", 0.7, 1) == ""
  raw = TEXT.encode("utf-8")
  for rate in (0.3, 1.0):
    out = fn(raw, rate, 2)
    assert isinstance(out, bytes)
    assert out.decode("utf-8") == fn(TEXT, rate, 2)  # bytes in: the same noise as the str, encoded


@pytest.mark.parametrize("fn", ALL, ids=[n.name for n in noise.NOISES])
def test_rate_out_of_range_or_invalid_utf8_raises(fn):
  with pytest.raises(ValueError):
    fn(TEXT, 1.5, 0)
  with pytest.raises(UnicodeDecodeError):
    fn(b"\xff\xfe", 0.5, 0)


def _letters(n: int, seed: int = 0) -> str:
  """n lowercase letters with no two neighbours equal (so repeats are visible as runs)."""
  rng = np.random.default_rng(seed)
  out = ["a"]
  while len(out) < n:
    c = string.ascii_lowercase[rng.integers(26)]
    if c != out[-1]:
      out.append(c)
  return "".join(out)


def test_drop_rate():
  text = _letters(20_000)
  out = noise.drop(text, 0.1, 0)
  assert abs(1 - len(out) / len(text) - 0.1) < 0.01


def test_random_caps_rate_touches_only_cased_letters():
  text = _letters(20_000) + "0123456789 .,;\u65e5" * 100
  out = noise.random_caps(text, 0.3, 0)
  assert len(out) == len(text)
  flipped = sum(a != b for a, b in zip(text, out))
  assert abs(flipped / 20_000 - 0.3) < 0.015
  assert out[20_000:] == text[20_000:]
  assert noise.random_caps(text, 1.0, 0) == text.swapcase()


def test_repeat_rate_and_counts():
  text = _letters(20_000)
  out = noise.repeat(text, 0.2, 0)
  runs = [len(m.group(0)) for m in re.finditer(r"(.)\1*", out)]
  assert len(runs) == len(text)  # every character is still there, in order
  repeated = [r for r in runs if r > 1]
  assert abs(len(repeated) / len(text) - 0.2) < 0.015
  assert set(repeated) == {2, 3, 4}


def test_caps_and_spell_rate_per_word():
  words = [_letters(6, s) for s in range(4000)]
  text = " ".join(words)
  capped = noise.caps(text, 0.25, 0).split(" ")
  assert len(capped) == len(words)
  assert abs(sum(w.isupper() for w in capped) / len(words) - 0.25) < 0.03
  assert noise.caps(TEXT, 1.0, 0) == TEXT.upper()
  spelled = noise.spell(text, 0.25, 0)
  pieces = spelled.split(" ")
  assert "".join(pieces) == "".join(words)  # only spaces were added
  assert abs((len(pieces) - len(words)) / (5 * len(words)) - 0.25) < 0.03  # a spelled 6-letter word adds 5 spaces


def test_spell_all_words_keeps_whitespace():
  assert noise.spell("ab  cd\nef", 1.0, 0) == "a b  c d\ne f"
  assert noise.spell("\u65e5\u672c \U0001F600x", 1.0, 3) == "\u65e5 \u672c \U0001F600 x"


def test_apply_seeds_each_document_on_its_own():
  docs = [TEXT, TEXT, TEXT[::-1]]
  n = noise.noise("drop")
  out = noise.apply(n, docs, seed=5)
  assert out == noise.apply(n, docs, seed=5)
  assert out[0] != out[1]  # same text, other index: other noise
  assert out[2] == n.fn(docs[2], n.rate, (5, 2))
  for n in noise.NOISES:
    for text in noise.apply(n, [d.encode("utf-8") for d in docs], seed=1):
      text.decode("utf-8")


def test_parse():
  assert noise.parse("all") == noise.NOISES
  assert noise.parse("none") == () and noise.parse("") == ()
  assert [n.name for n in noise.parse("spell, caps,caps")] == ["caps", "spell"]
  with pytest.raises(ValueError, match="unknown noise"):
    noise.parse("caps,shout")
