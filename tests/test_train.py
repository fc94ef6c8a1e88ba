"""The training system end to end: main on every data set, results.json, resume, refusals."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from featdiv_jax import data, main, runs, sharding, train
from featdiv_jax import workdir as workdir_lib
from featdiv_jax.workdir import WorkdirError
from tests_util import load_config

HISTORY_KEYS = {"step", "epoch", "train_loss", "eval_loss", "eval_accuracy", "eval_head_cosine"}
RESULT_KEYS = {"config", "history", "best_eval_accuracy", "final_eval_accuracy", "num_params",
               "wall_time_s", "train_images_per_s"}


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def read_results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def test_main_runs_the_digits_comparison_and_prints_three_accuracies(tmp_path, digits_dir,
                                                                     capsys):
  rc = main.main(["main", "--config=configs/digits.py:compare,smoke",
                  f"--config.dataset.data_dir={digits_dir}", f"--workdir={tmp_path}"])
  assert rc == 0
  table = capsys.readouterr().out
  for variant, heads in (("single", 1), ("multi", 2), ("multi_cos", 2)):
    r = read_results(tmp_path / variant)
    assert RESULT_KEYS <= set(r) and r["finished"] and r["variant"] == variant
    assert r["config"]["model"]["num_heads"] == heads
    assert [h["step"] for h in r["history"]] == [3, 6]
    assert all(HISTORY_KEYS <= set(h) for h in r["history"])
    assert all(h["eval_count"] == 360 for h in r["history"])  # every test digit, once
    assert 0.0 <= r["final_eval_accuracy"] <= 1.0 and r["train_images_per_s"] > 0
    assert np.array(r["eval_head_cosine_matrix"]).shape == (heads, heads)
    assert (r["history"][-1]["eval_head_cosine"] is None) == (heads == 1)
    # the per-head measures: CKA and ablations at every eval, the probes at the last one only
    first, last = r["history"]
    cka = np.array(r["eval_head_cka_matrix"])
    assert cka.shape == (heads, heads) and np.allclose(cka, cka.T)
    assert np.all((cka >= -1e-6) & (cka <= 1 + 1e-6))
    for h in r["history"]:
      assert (h["eval_head_cka"] is None) == (heads == 1)
      assert (h["eval_head_ablation_drop"] is None) == (heads == 1)
      if heads > 1:
        assert len(h["eval_head_ablation_accuracy"]) == heads
        np.testing.assert_allclose(h["eval_head_ablation_drop"], [
            h["eval_accuracy"] - a for a in h["eval_head_ablation_accuracy"]])
      assert h["eval_time_s"] > 0
    assert "eval_head_probe_accuracy" not in first
    assert len(last["eval_head_probe_accuracy"]) == heads and last["eval_probe_examples"] == 1437
    assert 0 <= last["eval_probe_all_accuracy"] <= 1 and last["eval_probe_time_s"] > 0
    assert f"{100 * r['final_eval_accuracy']:.2f}%" in table
    assert list((tmp_path / variant / "checkpoints").iterdir())
  single, multi = read_results(tmp_path / "single"), read_results(tmp_path / "multi")
  assert multi["num_params"] > single["num_params"]
  assert {"multi", "multi_cos", "single"} <= set(table.split())


@pytest.mark.parametrize("config", ["cifar10", "caltech101", "flowers102"])
def test_main_runs_each_tfds_data_set_under_mock_data(config, tmp_path):
  with tfds.testing.mock_data(num_examples=20):
    rc = main.main(["main", f"--config=configs/{config}.py:multi_cos,smoke",
                    f"--workdir={tmp_path}"])
  assert rc == 0
  r = read_results(tmp_path)
  assert r["finished"] and len(r["history"]) == 2
  assert r["history"][-1]["eval_count"] == 20
  assert r["config"]["dataset"]["image_size"] == 32


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, digits_dir):
  """An uninterrupted smoke run of the multi_cos model on digits."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  config = load_config("digits", "multi_cos,smoke", **{"dataset.data_dir": digits_dir})
  return config, workdir, train.train_and_evaluate(config, workdir)


def crash_and_resume(config, workdir, monkeypatch) -> dict:
  """Trains `config` in `workdir`, killed after step 4 (checkpoint at 3), then resumes it."""
  real_batches = data.train_batches

  def crashing_batches(*args, **kwargs):  # the process dies after step 4 (checkpoint at 3)
    for i, batch in enumerate(real_batches(*args, **kwargs)):
      # step 5 takes batch 4 from the device queue while batch 4 + PREFETCH is read
      if kwargs["start_step"] == 0 and i == 4 + sharding.PREFETCH:
        raise KeyboardInterrupt("simulated kill")
      yield batch

  with monkeypatch.context() as patch:
    patch.setattr(data, "train_batches", crashing_batches)
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(config, workdir)
  assert read_results(workdir)["history"][-1]["step"] == 3
  return train.train_and_evaluate(config, workdir)


def assert_same_history(got, want):
  assert [h["step"] for h in got["history"]] == [3, 6]
  for g, w in zip(got["history"], want["history"]):
    for key in ("eval_loss", "eval_accuracy", "eval_head_cosine", "train_loss"):
      np.testing.assert_allclose(g[key], w[key], rtol=1e-5, err_msg=key)


def test_kill_and_resume_ends_with_the_same_metrics(reference_run, tmp_path, monkeypatch):
  config, _, reference = reference_run
  assert_same_history(crash_and_resume(config, str(tmp_path), monkeypatch), reference)


@pytest.fixture
def default_prng():
  """JAX's default PRNG (threefry), which production runs use; the suite otherwise sets `rbg`
  (tests/conftest.py) because threefry compiles slowly on XLA:CPU. Compiled with XLA's
  optimisations off, which both runs of the comparison share, to keep that cost down."""
  before = jax.config.jax_default_prng_impl, jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_default_prng_impl", "threefry2x32")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_default_prng_impl", before[0])
  jax.config.update("jax_disable_most_optimizations", before[1])


def test_kill_and_resume_is_exact_under_the_default_prng(default_prng, digits_dir, tmp_path,
                                                          monkeypatch):
  assert "threefry" in str(jax.random.key_impl(jax.random.key(0)))
  config = load_config("digits", "multi_cos,smoke", **{"dataset.data_dir": digits_dir})
  reference = train.train_and_evaluate(config, str(tmp_path / "reference"))
  assert_same_history(crash_and_resume(config, str(tmp_path / "resumed"), monkeypatch),
                      reference)


def test_rerunning_a_finished_run_changes_nothing(reference_run):
  config, workdir, reference = reference_run
  again = train.train_and_evaluate(config, workdir)
  assert again["history"] == reference["history"]


def test_a_workdir_of_another_model_is_refused_untouched(reference_run):
  config, workdir, _ = reference_run
  before = sorted((p, os.path.getmtime(p)) for p in pathlib.Path(workdir).rglob("*"))
  other = load_config("digits", "multi_cos,smoke,heads=3",
                      **{"dataset.data_dir": config.dataset.data_dir})
  with pytest.raises(WorkdirError, match=r"model\.num_heads: workdir has 2, config has 3"):
    train.train_and_evaluate(other, workdir)
  assert sorted((p, os.path.getmtime(p)) for p in pathlib.Path(workdir).rglob("*")) == before


def test_a_heads_sharded_mesh_gives_the_same_run(reference_run, tmp_path):
  data_dir = reference_run[0].dataset.data_dir
  # The real loop (checkpoints, evaluations) on a mesh that splits the heads, against one that
  # only splits the batch, for the first 2 steps, evaluated and saved after each. Only 2: the
  # meshes' reduction orders differ in the last float bits, and this smoke model (batch 8,
  # BatchNorm on 1x1 maps) amplifies such differences about 10-100x per SGD step whatever the
  # mesh, heads split or not (packages of 2026-12-07; the per-step train loss of meshes (8, 1),
  # (4, 2) and (2, 1): 1e-7 apart at step 1, 1e-6 at 2, 3e-4 at 3, 5e-2 at 4). A 6-step
  # comparison measured that noise, not the mesh. SGD, not Adam: Adam turns near-zero gradients'
  # last-bit differences into lr-sized steps. Measured here: at most 1.4e-5 apart (eval head
  # cosine at step 2; train loss 1.5e-6, eval loss 7.5e-6), while the eval loss moves 1.2% from
  # step 1 to 2. A mesh that mixed heads or dropped a shard is off by far more than 1e-4.
  runs = {}
  for mesh in ((8, 1), (4, 2)):
    config = load_config("digits", "multi_cos,smoke", **{
        "dataset.data_dir": data_dir, "mesh": mesh, "optimizer.name": "sgd",
        "optimizer.learning_rate": 0.05, "total_steps": 2, "eval_every_steps": 1,
        "checkpoint_every_steps": 1, "log_every_steps": 1})
    runs[mesh] = train.train_and_evaluate(config, str(tmp_path / str(mesh)))["history"]
  want, got = runs[(8, 1)], runs[(4, 2)]
  assert [h["step"] for h in got] == [h["step"] for h in want] == [1, 2]
  rtol = 1e-4
  training_effect = abs(want[0]["eval_loss"] - want[-1]["eval_loss"]) / want[0]["eval_loss"]
  assert training_effect > 10 * rtol, training_effect
  for g, w in zip(got, want):
    for key in ("train_loss", "eval_loss", "eval_head_cosine"):
      np.testing.assert_allclose(g[key], w[key], rtol=rtol, err_msg=f"{key} at step {w['step']}")


def test_a_missing_data_set_is_one_clear_error(tmp_path, capsys):
  rc = main.main(["main", "--config=configs/cifar10.py:multi_cos,smoke",
                  f"--config.dataset.data_dir={tmp_path / 'tfds'}",
                  f"--workdir={tmp_path / 'run'}"])
  assert rc == 1
  err = capsys.readouterr().err
  assert "'cifar10' is not prepared" in err and "tfds build cifar10" in err
  assert "Traceback" not in err
  assert not (tmp_path / "run").exists()


def test_the_parameter_table_needs_no_data_this_process_does_not_hold():
  class Remote:  # a head-sharded array on several hosts: shape known, values elsewhere
    shape, dtype, is_fully_addressable = (4, 3), np.dtype("float32"), False

    def __array__(self, *args, **kwargs):
      raise AssertionError("fetched an array this process does not hold")

  params = {"heads": {"kernel": Remote()}, "fc": {"bias": np.ones(3, np.float32)}}
  table = train.parameter_table(params)
  assert "heads/kernel" in table and "(4, 3)" in table and "Total: 15" in table
  assert "Mean" not in table
  assert "Mean" in train.parameter_table({"fc": {"bias": np.ones(3, np.float32)}})


def test_eval_and_checkpoint_cadence_in_epochs_or_steps():
  config = load_config("flowers102", "multi_cos")
  schedule = train.Schedule.of(config, train_size=1020)  # batch 64: 15 steps per epoch
  assert (schedule.steps_per_epoch, schedule.total_steps) == (15, 450)
  assert (schedule.eval_every, schedule.checkpoint_every) == (15, 75)
  config.eval_every_epochs, config.checkpoint_every_steps = 2.5, 40
  schedule = train.Schedule.of(config, train_size=1020)
  assert (schedule.eval_every, schedule.checkpoint_every) == (38, 40)  # round(37.5): 38
  assert [s for s in range(1, 451) if schedule.due(s, schedule.eval_every)][-2:] == [418, 450]


def test_a_workdir_from_before_a_new_model_field_is_accepted(tmp_path):
  """A model field added later (here frozen_bn) had its default in older workdirs."""

  config = load_config("digits", "multi_cos,smoke")
  workdir_lib.record_config(str(tmp_path), config)
  saved = json.loads((tmp_path / "config.json").read_text())
  del saved["signature"]["model"]["frozen_bn"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  workdir_lib.check(str(tmp_path), config)
  config.model.frozen_bn = "batch"
  with pytest.raises(WorkdirError, match="model.frozen_bn: workdir has 'running', config has"):
    workdir_lib.check(str(tmp_path), config)


@pytest.mark.parametrize("keep_best", [True, False])
def test_keep_best_keeps_the_best_step_out_of_garbage_collection(digits_dir, tmp_path,
                                                                  monkeypatch, keep_best):
  accuracies = iter([0.1, 0.5, 0.3, 0.5, 0.2, 0.4])  # best at step 2, tied at 4
  real = train.evaluate_split

  def scripted(*args, **kwargs):
    return dict(real(*args, **kwargs), eval_accuracy=next(accuracies))

  monkeypatch.setattr(train, "evaluate_split", scripted)
  config = load_config("digits", "multi_cos,smoke", **{
      "dataset.data_dir": digits_dir, "eval_every_steps": 1, "checkpoint_every_steps": 3,
      "keep_checkpoints": 1, "keep_best": keep_best})
  got = train.train_and_evaluate(config, str(tmp_path))
  assert got["best_step"] == 2 and got["best_eval_accuracy"] == 0.5
  kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == ([2, 6] if keep_best else [6])
  if keep_best:
    assert runs.load(str(tmp_path), "best").step == 2
  else:
    with pytest.raises(runs.RunError, match="no checkpoint of step 2.*keep_best=True"):
      runs.load(str(tmp_path), "best")


def test_the_pretrained_head_protocol_trains_single_first_and_freezes_it_as_head_0(
    tmp_path, digits_dir, capsys):
  rc = main.main(["main", "--config=configs/digits.py:compare,smoke",
                  "--config.protocol=pretrained_head",
                  "--config.compare_variants=('multi_cos','multi','single')",
                  f"--config.dataset.data_dir={digits_dir}", f"--workdir={tmp_path}"])
  assert rc == 0, capsys.readouterr().err
  single = runs.load(str(tmp_path / "single"))
  stage_1 = runs.head_variables(single, 0)
  assert read_results(tmp_path / "single")["initialised_from"] is None
  for variant in ("multi", "multi_cos"):
    results = read_results(tmp_path / variant)
    assert results["initialised_from"] == dict(path=str(tmp_path / "single"), step=6, head=0)
    assert results["config"]["model"]["frozen_heads"] == [0]
    run = runs.load(str(tmp_path / variant))
    jax.tree.map(np.testing.assert_array_equal, runs.head_variables(run, 0), stage_1)
    head_1 = runs.head_variables(run, 1)["params"]["conv1"]["kernel"]
    assert not np.allclose(head_1, stage_1["params"]["conv1"]["kernel"])


RECIPE = {"label_smoothing": 0.1, "optimizer.clip_norm": 1.0, "optimizer.ema_decay": 0.9,
          "optimizer.accum_steps": 2, "optimizer.decay_norm_and_bias": False,
          "dataset.train_crop": "random_resized", "dataset.mixup_alpha": 0.4,
          "dataset.cutmix_alpha": 1.0, "model.drop_path": 0.2, "batch_size": 16}


def test_kill_and_resume_is_exact_with_every_recipe_field_on(digits_dir, tmp_path, monkeypatch):
  config = load_config("digits", "multi_cos,smoke", **{"dataset.data_dir": digits_dir}, **RECIPE)
  reference = train.train_and_evaluate(config, str(tmp_path / "reference"))
  resumed = crash_and_resume(config, str(tmp_path / "resumed"), monkeypatch)
  assert_same_history(resumed, reference)
  for got, want in zip(resumed["history"], reference["history"]):
    for key in ("eval_ema_accuracy", "eval_ema_loss"):  # the EMA is checkpointed
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
  saved = reference["config"]
  for field, value in RECIPE.items():  # results.json's config records every field
    node = saved
    for part in field.split("."):
      node = node[part]
    assert node == value, field


def test_a_checkpoint_from_before_the_ema_field_restores(tmp_path):
  """Checkpoints written before TrainState had `ema` hold four fields; they restore into a state
  without an EMA (and one with an EMA saves and restores it)."""
  import flax
  import orbax.checkpoint as ocp
  from featdiv_jax import checkpoint, steps

  @flax.struct.dataclass
  class OldTrainState:
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: tuple

  old = OldTrainState(step=np.int32(4), params={"w": np.arange(3, dtype=np.float32)},
                      batch_stats={"mean": np.ones(2, np.float32)}, opt_state=(np.zeros(3),))
  with ocp.CheckpointManager(str(tmp_path), item_names=("state", "meta")) as manager:
    manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(old),
                                            meta=ocp.args.JsonSave({"step": 4})))
    manager.wait_until_finished()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                          steps.TrainState(step=old.step, params=old.params,
                                           batch_stats=old.batch_stats, opt_state=old.opt_state))
  ckpts = checkpoint.Checkpoints(str(tmp_path), async_save=False)
  step, state, meta = ckpts.restore_latest(abstract)
  assert step == 4 and meta == {"step": 4} and state.ema is None
  np.testing.assert_array_equal(state.params["w"], old.params["w"])
  with_ema = state.replace(step=np.int32(5), ema=steps.ema_start(
      {"params": {"w": np.full(3, 7.0, np.float32)}, "batch_stats": state.batch_stats}))
  ckpts.save(5, with_ema, {"step": 5})
  ckpts.wait()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                          with_ema)
  step, state, _ = ckpts.restore_latest(abstract)
  ckpts.close()
  assert step == 5
  np.testing.assert_array_equal(state.ema["params"]["w"], np.full(3, 7.0))
