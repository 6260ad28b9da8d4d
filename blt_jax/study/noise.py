"""Noised held-out text: the paper's five noised-input types, seeded and applied per document.

Each noise is a pure function `fn(text, rate, seed)` over characters (Unicode code points), never bytes, so its
output is valid UTF-8 whatever the text: bytes in give bytes out (decoded as strict UTF-8), str in gives str out.
`rate` is in [0, 1] and 0 returns the text unchanged; `seed` is anything `np.random.default_rng` takes (an int, or a
sequence of ints). A word is a maximal run of non-whitespace characters; the whitespace between words is kept.

  caps         each word in capitals with probability `rate`. The study uses 1: the whole text in capitals (the
               paper's "uppercase").
  random_caps  each cased letter's case flipped with probability `rate`. The study uses 0.5, which leaves every
               letter upper or lower case at random (the paper's "random case").
  drop         each character dropped with probability `rate`. The study uses 0.1 (the paper's 10%).
  repeat       each character, with probability `rate`, written 2, 3 or 4 times (uniformly) instead of once. The study
               uses 0.2 (the paper repeats 20% of characters, up to 4 times).
  spell        each word, with probability `rate`, spelled out: one space between each two of its characters
               ("char" -> "c h a r"). The study uses 1: every word. The paper's "antspeak" also puts the text in
               capitals; here that is `caps`' job, so each noise measures one thing.

`apply(noise, texts, seed)` noises documents at the study's rate, document i from the seed (seed, i): a document's
noise depends on nothing but itself, its index and the seed, so every model reads the same noised text.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, List, Sequence, Tuple, Union

import numpy as np

Text = Union[str, bytes]
_WORD_SPLIT = re.compile(r"(\s+)")  # keeps the whitespace: words at even indices, whitespace at odd


def _noise(fn: Callable[[str, float, np.random.Generator], str]) -> Callable[..., Text]:
  """`fn` over str, lifted to str or bytes, with the rate checked and rate 0 (or empty text) the identity."""

  @functools.wraps(fn)
  def noised(text: Text, rate: float, seed) -> Text:
    if not 0.0 <= rate <= 1.0:
      raise ValueError(f"{fn.__name__}: rate {rate} is not in [0, 1]")
    chars = text.decode("utf-8") if isinstance(text, bytes) else text
    out = chars if rate == 0 or not chars else fn(chars, rate, np.random.default_rng(seed))
    return out.encode("utf-8") if isinstance(text, bytes) else out

  return noised


def _per_word(text: str, rate: float, rng: np.random.Generator, change: Callable[[str], str]) -> str:
  parts = _WORD_SPLIT.split(text)
  picked = rng.random(len(parts)) < rate  # one draw per part; whitespace parts ignore theirs
  return "".join(change(p) if i % 2 == 0 and pick else p for i, (p, pick) in enumerate(zip(parts, picked)))


@_noise
def caps(text: str, rate: float, rng: np.random.Generator) -> str:
  return _per_word(text, rate, rng, str.upper)


def _cased(c: str) -> bool:
  return c.upper() != c.lower()


@_noise
def random_caps(text: str, rate: float, rng: np.random.Generator) -> str:
  flip = rng.random(len(text)) < rate
  return "".join(c.swapcase() if f and _cased(c) else c for c, f in zip(text, flip))


@_noise
def drop(text: str, rate: float, rng: np.random.Generator) -> str:
  keep = rng.random(len(text)) >= rate
  return "".join(c for c, k in zip(text, keep) if k)


@_noise
def repeat(text: str, rate: float, rng: np.random.Generator) -> str:
  times = np.where(rng.random(len(text)) < rate, rng.integers(2, 5, len(text)), 1)
  return "".join(c * int(k) for c, k in zip(text, times))


@_noise
def spell(text: str, rate: float, rng: np.random.Generator) -> str:
  return _per_word(text, rate, rng, " ".join)


@dataclasses.dataclass(frozen=True)
class Noise:
  name: str  # as --noise names it
  fn: Callable[..., Text]
  rate: float  # the study's rate
  label: str


NOISES: Tuple[Noise, ...] = (
    Noise("caps", caps, 1.0, "all capitals"),
    Noise("random_caps", random_caps, 0.5, "random capitalisation"),
    Noise("drop", drop, 0.1, "dropped characters"),
    Noise("repeat", repeat, 0.2, "repeated characters"),
    Noise("spell", spell, 1.0, "spelled out with spaces"),
)


def noise(name: str) -> Noise:
  for n in NOISES:
    if n.name == name:
      return n
  raise ValueError(f"unknown noise {name!r}; known: {', '.join(n.name for n in NOISES)}")


def parse(spec: str) -> Tuple[Noise, ...]:
  """`--noise`: "all", "none" (or empty), or comma-separated names; the study's order, no repeats."""
  spec = spec.strip()
  if spec == "all":
    return NOISES
  if spec in ("", "none"):
    return ()
  names = {noise(name.strip()).name for name in spec.split(",") if name.strip()}
  return tuple(n for n in NOISES if n.name in names)


def apply(n: Noise, texts: Sequence[Text], seed: int) -> List[Text]:
  """`texts` under noise `n` at its study rate, document i seeded by (seed, i)."""
  return [n.fn(t, n.rate, (seed, i)) for i, t in enumerate(texts)]
