"""scripts/plot_patches.py: the entropy figure from a checkpoint's own entropy model and patcher."""

import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np

from blt_jax import checkpoint, tokenizer
from blt_jax.entropy_model import compute_entropies
from test_generate import MODELS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script():
  spec = importlib.util.spec_from_file_location("plot_patches", ROOT / "scripts" / "plot_patches.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_plot_writes_a_png_with_the_patchers_boundaries(tmp_path, capsys):
  m = MODELS["entropy-max_patch_length"]()
  checkpoint.save_params(
      tmp_path / "ckpt",
      m.params,
      {"format": "blt_jax", "model_type": "blt", "model": m.config.to_dict(), "patching": m.patching.to_dict()},
  )
  checkpoint.save_params(
      tmp_path / "ckpt" / "entropy_model",
      m.entropy_params,
      {"format": "blt_jax", "model_type": "entropy_model", "model": m.entropy_config.to_dict()},
  )
  plot = _script()
  text = b"Daenerys Targaryen is in Game of Thrones"
  data, ent, starts = plot.patch_data(m, text)
  assert data == text and ent.shape == (len(text),) and starts.shape == (len(text),)
  assert starts[0]  # the first byte after [BOS] always starts a patch
  gaps = np.diff(np.flatnonzero(np.append(starts, True)))
  assert gaps.max() <= 3  # max_patch_length
  # The drawn entropies are the entropy model's full forward on [BOS] + text, each at the byte it predicts.
  tokens = jnp.asarray([tokenizer.encode(text, add_eos=False)])
  np.testing.assert_allclose(
      ent, np.asarray(compute_entropies(m.entropy_params, tokens, m.entropy_config))[0, :-1], rtol=1e-6
  )
  # The boundaries are the rule's, worked out here by hand: a byte after the first starts a patch when the entropy
  # drawn at it (that of predicting it) exceeds the threshold, or when its patch would grow past max_patch_length.
  expected, last = [], 0
  for t, e in enumerate(ent):
    start = t == 0 or e > m.patching.threshold or t - last == m.patching.max_patch_length
    last = t if start else last
    expected.append(start)
  assert 3 < sum(expected) < len(text) - 3  # neither every byte its own patch nor only max_patch_length splits
  np.testing.assert_array_equal(starts, expected)
  assert (
      plot.main(["--checkpoint", str(tmp_path / "ckpt"), "--text", text.decode(), "--out", str(tmp_path / "p.png")])
      == 0
  )
  assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert f"{int(starts.sum())} patches" in capsys.readouterr().out
  assert plot.main(["--checkpoint", str(tmp_path / "nope"), "--text", "x"]) == 2
