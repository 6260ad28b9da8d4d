"""`blt_jax.calibrate`: the threshold and max_patches fitted on some rows hold on rows it did not see; the command.

A random tiny entropy model on the stdlib corpus (the default) keeps it cheap: its entropies still vary from byte
to byte, which is all that fitting a threshold needs.
"""

import dataclasses
import json
import pathlib
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from blt_jax import calibrate, checkpoint, steps
from blt_jax import data as data_lib
from blt_jax.config import EntropyModelConfig, PatchingConfig
from blt_jax.entropy_model import init_entropy_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEQ_LEN = 256
ENTROPY = EntropyModelConfig(dim=32, n_layers=1, n_heads=2, multiple_of=32, sliding_window=32, max_seqlen=128)


@pytest.fixture(scope="module")
def entropy_model():
  return nn.meta.unbox(init_entropy_model(jax.random.PRNGKey(0), ENTROPY))


@pytest.fixture(scope="module")
def entropy_dir(entropy_model, tmp_path_factory):
  path = tmp_path_factory.mktemp("entropy") / "model"
  checkpoint.save_params(
      path, entropy_model, {"format": "blt_jax", "model_type": "entropy_model", "model": ENTROPY.to_dict()}
  )
  return path


@pytest.fixture(scope="module")
def split():
  """Half the stdlib's documents for calibrating, the other half held out (the validation split)."""
  cfg = data_lib.default_data_config()
  cfg.validation_fraction = 0.5
  cfg.prefetch = 0
  return cfg


@pytest.fixture(scope="module")
def held_out(split, entropy_model):
  """(tokens, entropies) of 1024 full rows of the held-out documents (the validation split), every 16th of the
  validation pass's first 16384 (its documents come in a fixed order; striding reaches more of them)."""
  rows = []
  for i, batch in enumerate(data_lib.make_eval_iterator(split, SEQ_LEN, 2048, process_index=0, process_count=1)):
    rows.append(batch["tokens"][batch["loss_mask"].sum(axis=1) == SEQ_LEN])
    if i == 7:
      break
  tokens = np.concatenate(rows)[::16][:1024]
  assert len(tokens) == 1024
  return tokens, calibrate.row_entropies(tokens, entropy_model, ENTROPY)


@pytest.fixture(scope="module")
def seen(split):
  """The rows calibration sees: 512 of the training half's stream."""
  return calibrate.sample_rows(split, SEQ_LEN, 512, seed=0)


def trainer_patch_counts(tokens, entropies, patching):
  """Patches per row as the train step makes them: the jitted `steps.make_patches`."""
  sc = steps.StepConfig(model=None, patching=patching, max_patches=SEQ_LEN + 1)
  make = jax.jit(lambda batch: steps.make_patches(sc, batch, None).num_patches_B)
  return np.asarray(make(dict(tokens=tokens, entropies=entropies)))


@pytest.mark.parametrize(
    "patching",
    [PatchingConfig(mode="entropy"), PatchingConfig(mode="entropy", monotonicity=True, max_patch_length=8)],
    ids=["plain", "monotonic_max_length_8"],
)
def test_calibration_holds_on_held_out_rows(entropy_model, seen, held_out, patching):
  target, overflow = 4.5, 0.05
  rows = seen
  result = calibrate.calibrate(
      rows, patching, target, entropy_params=entropy_model, entropy_config=ENTROPY, overflow=overflow
  )
  assert result.rows == 512 and abs(result.bytes_per_patch / target - 1) < 0.01
  assert result.patches_per_row["p50"] <= result.patches_per_row["p90"] <= result.max_patches
  assert result.max_patches <= result.patches_per_row["max"]

  tokens, entropies = held_out
  assert not set(map(bytes, tokens)) & set(map(bytes, rows["tokens"]))
  fitted = dataclasses.replace(patching, threshold=result.threshold)
  counts = trainer_patch_counts(tokens, entropies, fitted)
  # Op by op (calibration) and jitted (the train step), the patcher makes the same patches.
  np.testing.assert_array_equal(counts, calibrate.patches_per_row(tokens, entropies, fitted, result.threshold))
  assert abs(calibrate.bytes_per_patch(counts, SEQ_LEN) / target - 1) < 0.05
  assert np.mean(counts > result.max_patches) <= overflow


def test_slots_bound_the_overflow_rate():
  counts = np.arange(1, 1001)
  # Binomial(1000, 0.01): P(X <= 4) < 5% <= P(X <= 5), so the 5th largest count is the 95% bound.
  assert calibrate.slots_for(counts, 0.01) == 996
  assert calibrate.slots_for(counts, 0.01, multiple_of=128) == 1024
  assert calibrate.slots_for(counts, 1e-3) == 1000  # too few rows to bound 0.1%: the sample's max
  assert calibrate.slots_for(counts, 0.0) == 1000


def test_command_prints_and_writes_the_numbers(entropy_dir, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(calibrate, "SAMPLE_SPAN_BYTES", 256 << 10)  # rows from the first 256 KiB: quick to read
  out = tmp_path / "deep" / "calibration.json"
  calibrate.main(
      [
          "--checkpoint",
          str(entropy_dir),
          "--bytes-per-patch",
          "3",
          "--seq-len",
          str(SEQ_LEN),
          "--max-rows",
          "32",
          "--overflow",
          "0.05",
          "--multiple-of",
          "8",
          "--json",
          str(out),
      ]
  )
  printed = capsys.readouterr().out
  saved = json.loads(out.read_text())
  assert saved["rows"] == 32 and saved["max_patches"] % 8 == 0 and abs(saved["bytes_per_patch"] / 3 - 1) < 0.02
  assert set(saved["patches_per_row"]) == {"p50", "p90", "p99", "p99.9", "max"}
  assert f"--config.patching.threshold={saved['threshold']!r}" in printed
  assert f"--config.patching.max_patches={saved['max_patches']}" in printed
  assert saved["overrides"] in printed and "padding:" in printed and "p99.9" in printed
  assert list(tmp_path.joinpath("deep").iterdir()) == [out]  # no temporary file left behind


@pytest.mark.parametrize(
    "args, match",
    [
        (["--bytes-per-patch", "0.5"], "out of range.*between 1 and the row length"),
        (["--bytes-per-patch", "300"], "out of range.*between 1 and the row length"),
        (["--input", "EMPTY"], "--input .*no .*documents"),
        (["--checkpoint", "NO_MODEL"], "--checkpoint .*no entropy model"),
    ],
)
def test_command_errors_are_one_line(entropy_dir, tmp_path, args, match):
  (tmp_path / "empty.jsonl").write_text("")
  (tmp_path / "no_model").mkdir()
  argv = ["--checkpoint", str(entropy_dir), "--bytes-per-patch", "4", "--seq-len", str(SEQ_LEN), "--max-rows", "8"]
  argv += [
      a.replace("EMPTY", str(tmp_path / "empty.jsonl")).replace("NO_MODEL", str(tmp_path / "no_model")) for a in args
  ]
  with pytest.raises(SystemExit) as e:
    calibrate.main(argv)
  message = str(e.value)
  assert message.startswith("error: ") and "\n" not in message
  assert re.search(match, message), message


# ---------------------------------------------------------------------------------------------------------------
# The trainer: patching.target_bytes_per_patch.

MICRO_BLT = {
    "model.dim_local_encoder": 32,
    "model.dim_local_decoder": 32,
    "model.n_heads_local_encoder": 2,
    "model.n_heads_local_decoder": 2,
    "model.n_layers_local_decoder": 1,
    "model.dim_global": 64,
    "model.n_layers_global": 1,
    "model.n_heads_global": 2,
    "model.cross_attn_nheads": 2,
    "model.encoder_hash_byte_group_size": (3, 4),
    "model.encoder_hash_byte_group_vocab": 512,
    "model.multiple_of": 32,
    "model.max_seqlen": 128,
    "model.max_encoder_seq_length": 128,
    "model.local_attention_window_len": 32,
    "seq_len": 64,
    "num_steps": 1,
    "checkpoint_every": 1,
    "async_checkpointing": False,
    "data.validation_fraction": 0.0,
    "data.num_threads": 1,
    "data.prefetch": 0,
    "mesh.fsdp": 1,
    "mesh.data": -1,
}


def test_trainer_calibrates_once_and_a_resume_reuses_the_threshold(entropy_dir, tmp_path, capsys, monkeypatch):
  from blt_jax import train, train_config  # pylint: disable=g-import-not-at-top

  cfg = train_config.load_config_file(str(pathlib.Path(__file__).parents[1] / "configs" / "tiny_entropy.py"))
  overrides = {
      **MICRO_BLT,
      "entropy_checkpoint": str(entropy_dir),
      "patching.threshold": 99.0,
      "patching.target_bytes_per_patch": 3.0,
      "patching.calibration_rows": 64,
      "patching.max_patch_length": 8,
  }
  for key, value in overrides.items():
    section, _, leaf = key.rpartition(".")
    (cfg[section] if section else cfg)[leaf] = value
  workdir = tmp_path / "run"
  monkeypatch.setattr(calibrate, "SAMPLE_SPAN_BYTES", 64 << 10)  # rows from the first 64 KiB: quick to read

  def exported_threshold():
    return json.loads((workdir / "export" / "config.json").read_text())["patching"]["threshold"]

  train.train(cfg, str(workdir))
  printed = capsys.readouterr().out
  expected = calibrate.calibrate(
      calibrate.sample_rows(cfg.data, 64, 64, cfg.seed),
      train_config.patching_config(cfg),
      3.0,
      entropy_params=nn.meta.unbox(checkpoint.load_params(entropy_dir)[0]),
      entropy_config=ENTROPY,
  ).threshold
  assert f"patching.threshold={expected!r}: calibrated for target_bytes_per_patch=3" in printed
  assert exported_threshold() == expected
  with checkpoint.Checkpointer(workdir) as ckpt:
    assert ckpt.read_meta(1)["config"]["patching"]["threshold"] == expected

  def no_recalibration(*args, **kwargs):
    raise AssertionError("a resumed run recalibrated")

  monkeypatch.setattr(calibrate, "calibrate", no_recalibration)
  cfg.num_steps = 2
  trainer = train.Trainer(cfg, str(workdir))  # the threshold is fixed here, before the steps are built
  try:
    assert trainer.sc.patching.threshold == expected
  finally:
    trainer.close()
  assert f"patching.threshold={expected!r}: stored with the run (checkpoint step 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"patching.mode": "space"}, "target_bytes_per_patch=4.5 calibrates an entropy threshold.*mode='entropy'"),
        ({"patching.target_bytes_per_patch": 0.5}, "between 1 and the row length"),
        ({"patching.target_bytes_per_patch": 300.0}, "between 1 and the row length"),
        ({"patching.calibration_rows": 0}, "calibration_rows must be >= 1"),
    ],
)
def test_config_target_errors(overrides, match):
  from blt_jax import train_config  # pylint: disable=g-import-not-at-top

  cfg = train_config.load_config_file(str(pathlib.Path(__file__).parents[1] / "configs" / "tiny_entropy.py"))
  cfg.patching.target_bytes_per_patch = 4.5
  for key, value in overrides.items():
    cfg.patching[key.split(".")[1]] = value
  with pytest.raises(ValueError, match=match):
    train_config.validate(cfg)


def test_init_from_a_blt_keeps_its_threshold():
  from blt_jax import train_config  # pylint: disable=g-import-not-at-top

  cfg = train_config.base_config()
  cfg.patching.target_bytes_per_patch = 4.5
  meta = {"model_type": "blt", "model": {}, "patching": PatchingConfig(threshold=1.25).to_dict()}
  changes = train_config.apply_checkpoint_config(cfg, meta)
  assert cfg.patching.threshold == 1.25 and cfg.patching.target_bytes_per_patch == 0.0
  assert ("patching.target_bytes_per_patch", 4.5, 0.0) in changes


def test_row_budget_is_the_cheapest_and_the_packers(seen, entropy_model):
  """`fit_row_budget` picks the max_patches with the fewest FLOPs per byte learnt, counting a row's bytes as the
  loader's `RowPatcher` cuts them, with rows weighted as a packed stream takes them (1 / bytes)."""
  from blt_jax import flops, train_config  # pylint: disable=g-import-not-at-top
  from blt_jax.data import patch_rows  # pylint: disable=g-import-not-at-top

  tokens = np.asarray(seen["tokens"])[:64]
  entropies = calibrate.row_entropies(tokens, entropy_model, ENTROPY)
  patching = PatchingConfig(mode="entropy", max_patch_length=12)
  threshold, _ = calibrate.fit_threshold(tokens, entropies, patching, 4.0)
  patching = dataclasses.replace(patching, threshold=threshold)
  starts = calibrate.row_starts(tokens, entropies, patching)
  assert starts.shape == (64, SEQ_LEN + 1)
  model = train_config.model_config(train_config.load_config_file(str(ROOT / "configs" / "tiny.py")))
  budget = calibrate.fit_row_budget(starts, model, byte_rows_max_patches=SEQ_LEN + 1, multiple_of=8)
  assert budget.max_patches % 8 == 0 and 0 < budget.row_fill <= 1 and 0 < budget.slot_fill <= 1
  patcher = patch_rows.RowPatcher(patching.patch_kwargs(), 2, SEQ_LEN)

  def cost(slots):  # the loader's own cut, row by row
    patcher.max_patches = slots
    lengths = np.array([patcher.row_length(s, SEQ_LEN) for s in starts])
    assert np.all(np.cumsum(starts, axis=1)[np.arange(64), lengths] <= slots)
    return flops.blt_train_flops_per_byte(model, SEQ_LEN, SEQ_LEN / slots) * SEQ_LEN * np.mean(1.0 / lengths)

  costs = {slots: cost(slots) for slots in range(8, int(starts.sum(axis=1).max()) + 8, 8)}
  assert min(costs, key=costs.get) == budget.max_patches
  np.testing.assert_allclose(budget.cost_per_byte, costs[budget.max_patches], rtol=1e-9)
  assert budget.overrides() == f"--config.patching.rows=patches --config.patching.max_patches={budget.max_patches}"


def test_command_fits_a_row_budget(entropy_dir, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(calibrate, "SAMPLE_SPAN_BYTES", 256 << 10)
  out = tmp_path / "calibration.json"
  argv = ["--checkpoint", str(entropy_dir), "--bytes-per-patch", "3", "--seq-len", str(SEQ_LEN), "--max-rows", "32"]
  with pytest.raises(SystemExit, match="--rows patches needs --config"):
    calibrate.main(argv + ["--rows", "patches"])
  calibrate.main(
      argv
      + ["--rows", "patches", "--config", str(ROOT / "configs" / "tiny.py"), "--multiple-of", "8", "--json", str(out)]
  )
  printed = capsys.readouterr().out
  saved = json.loads(out.read_text())["row_budget"]
  assert saved["max_patches"] % 8 == 0 and saved["overrides"] in printed
  assert "FLOPs per byte learnt" in printed
