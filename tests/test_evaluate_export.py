"""featdiv_jax.evaluate and featdiv_jax.export on tiny trained digits runs: the evaluation
reproduces the training loop's, the exported timm state dict gives back the heads bit for bit,
and every mistake is one line, exit status 1, nothing written."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from featdiv_jax import evaluate, export, models, runs, steps, train
from featdiv_jax.models import timm_import
from tests_util import ROOT, load_config, save_random_run


@pytest.fixture(scope="module", autouse=True)
def quick_compiles():
  """XLA's optimisations off for this module (tiny models: compiling is most of the cost)."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory, digits_dir):
  """A finished 2-head multi_cos smoke run (6 steps, evaluated and saved at 3 and 6)."""
  workdir = str(tmp_path_factory.mktemp("multi"))
  config = load_config("digits", "multi_cos,smoke", **{"dataset.data_dir": digits_dir})
  return workdir, train.train_and_evaluate(config, workdir)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, digits_dir):
  """A `single` run's workdir as the training loop leaves it -- config.json and a checkpoint
  (step 5) of the train state its Trainer builds, saved the loop's way -- with random values
  in place of trained ones (BatchNorm statistics and gammas too): what export reads is the same,
  and no train step has to compile."""
  workdir = str(tmp_path_factory.mktemp("single"))
  config = load_config("digits", "single,smoke", **{"dataset.data_dir": digits_dir})
  state = save_random_run(workdir, config, [5])
  return workdir, state


def snapshot(directory):
  return sorted((str(p), p.stat().st_mtime_ns) for p in pathlib.Path(directory).rglob("*"))


# --- evaluate ---------------------------------------------------------------------------------


def test_evaluate_reproduces_the_final_and_an_earlier_evaluation(multi_run, capsys):
  workdir, results = multi_run
  assert results["finished"] and [h["step"] for h in results["history"]] == [3, 6]
  for which, want in (("latest", results["history"][-1]), ("3", results["history"][0])):
    assert evaluate.main(["--workdir", workdir, "--step", which]) == 0
    path = os.path.join(workdir, f"eval_test_{want['step']}.json")
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and line.strip().endswith(path)
    assert line.startswith(f"test at step {want['step']}: accuracy")
    with open(path) as f:
      got = json.load(f)
    assert (got["split"], got["step"], got["checkpoint"], got["eval_count"]) == (
        "test", want["step"], which, 360)
    # Exactly: the same compiled eval step on the same state, data and batches.
    for key in ("eval_accuracy", "eval_loss", "eval_head_cosine", "eval_head_cka",
                "eval_head_ablation_accuracy"):
      assert got[key] == want[key], key
    assert f"heads: cos {want['eval_head_cosine']:.3f}, CKA {want['eval_head_cka']:.3f}" in line
    if which == "latest":
      assert got["eval_accuracy"] == results["final_eval_accuracy"]
      assert got["eval_head_cosine_matrix"] == results["eval_head_cosine_matrix"]
      assert np.array(got["eval_head_cosine_matrix"]).shape == (2, 2)


def test_evaluate_another_split_at_the_best_step(multi_run, capsys):
  workdir, results = multi_run
  best = max(results["history"], key=lambda h: (h["eval_accuracy"], -h["step"]))["step"]
  assert evaluate.main(["--workdir", workdir, "--split", "train[:40]", "--step", "best"]) == 0
  with open(os.path.join(workdir, f"eval_train__40__{best}.json")) as f:
    got = json.load(f)
  assert (got["split"], got["step"], got["checkpoint"], got["eval_count"]) == (
      "train[:40]", best, "best", 40)
  assert 0.0 <= got["eval_accuracy"] <= 1.0
  assert np.array(got["eval_head_cosine_matrix"]).shape == (2, 2)
  assert capsys.readouterr().out.startswith(f"train[:40] at step {best}: accuracy")
  # the probes on request, on an even subset of training examples, as at a run's last eval
  assert evaluate.main(["--workdir", workdir, "--step", "latest", "--probe-examples",
                        "100"]) == 0
  with open(os.path.join(workdir, f"eval_test_{results['step']}.json")) as f:
    probed = json.load(f)
  assert probed["eval_probe_examples"] == 96 and len(probed["eval_head_probe_accuracy"]) == 2
  assert "probe " in capsys.readouterr().out
  assert evaluate.main(["--workdir", workdir, "--probe-examples", "-1"]) == 1
  assert "--probe-examples -1" in capsys.readouterr().err


# --- export -----------------------------------------------------------------------------------


def assert_bitwise_equal(got, want):
  got_leaves = jax.tree.leaves_with_path(got)
  want_leaves = jax.tree.leaves_with_path(want)
  assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
  for (path, g), (_, w) in zip(got_leaves, want_leaves):
    g, w = np.asarray(g), np.asarray(w)
    assert g.dtype == w.dtype and g.shape == w.shape, jax.tree_util.keystr(path)
    assert g.tobytes() == w.tobytes(), jax.tree_util.keystr(path)


@pytest.mark.parametrize("name", ["tiny_basic", "tiny_bottleneck"])
def test_timm_state_dict_of_imported_weights_is_the_file(name):
  """to_timm_state_dict inverts load_timm_weights on state dicts that timm itself wrote: the
  same names (num_batches_tracked included), dtypes, shapes and bytes."""
  path = ROOT / "tests" / "fixtures" / f"{name}.safetensors"
  timm_state = load_file(path)
  io = np.load(ROOT / "tests" / "fixtures" / f"{name}_io.npz")
  options = dict(block=str(io["block"][0]), stage_sizes=tuple(io["layers"]),
                 widths=tuple(io["channels"]), stem_width=64)
  variables = models.load_timm_weights(path, "seresnet18", **options)
  ours = timm_import.to_timm_state_dict(variables)
  assert sorted(ours) == sorted(timm_state)
  for key, value in timm_state.items():
    assert (ours[key].dtype, ours[key].shape) == (value.dtype, value.shape), key
    assert ours[key].tobytes() == value.tobytes(), key


def test_export_of_a_single_run_is_the_timm_model_with_its_fc(single_run, tmp_path, capsys):
  workdir, saved = single_run
  out = str(tmp_path / "single.safetensors")
  assert export.main(["--workdir", workdir, "--out", out]) == 0
  assert "timm seresnet_tiny, num_classes=10" in capsys.readouterr().out
  state = load_file(out)
  assert state["fc.weight"].shape == (10, 64) and state["conv1.weight"].shape == (8, 3, 7, 7)
  assert state["layer1.0.se.fc1.weight"].shape == (8, 8, 1, 1)
  assert state["bn1.num_batches_tracked"] == 5
  config = runs.read_config(workdir)
  loaded = models.load_timm_weights(out, config.model.arch, stem=config.model.stem)
  variables = {"params": saved.params, "batch_stats": saved.batch_stats}
  want = models.extract_head(variables, 0)
  want["params"]["fc"] = saved.params["fc"]
  assert_bitwise_equal(loaded, want)

  # The timm-layout model computes the run's own model's logits.
  x = np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype(np.float32)
  timm_like = models.create_model(config.model.arch, 10, stem=config.model.stem)
  got = jax.jit(timm_like.apply)(loaded, x)
  ours = steps.build_model(config.model, 10)
  want_logits, _ = jax.jit(ours.apply, static_argnums=2)(variables, x, False)
  assert np.all(np.isfinite(got)) and np.ptp(got) > 0.1
  # The same up to float32 rounding: the two graphs order a few operations differently (with
  # XLA's optimisations on they happen to agree bit for bit). A wrong layout is off by ~0.1.
  np.testing.assert_allclose(got, want_logits, rtol=0, atol=1e-6 * np.abs(want_logits).max())


def test_export_of_a_heads_backbone(multi_run, tmp_path, capsys):
  workdir, _ = multi_run
  out = str(tmp_path / "head1.safetensors")
  assert export.main(["--workdir", workdir, "--head", "1", "--step", "3", "--out", out]) == 0
  assert "backbone, num_classes=0" in capsys.readouterr().out
  state = load_file(out)
  assert not any(k.startswith("fc.") for k in state)
  assert state["layer2.0.downsample.0.weight"].shape == (16, 8, 1, 1)
  assert state["layer2.0.bn1.num_batches_tracked"] == 3
  run = runs.load(workdir, "3")
  loaded = models.load_timm_weights(out, run.config.model.arch, stem=run.config.model.stem)
  assert_bitwise_equal(loaded, runs.head_variables(run, 1))
  other = runs.head_variables(run, 0)["params"]["conv1"]["kernel"]
  assert not np.array_equal(loaded["params"]["conv1"]["kernel"], other)


# --- mistakes: one line, exit status 1, nothing written ---------------------------------------


@pytest.fixture(scope="module")
def run_without_checkpoints(multi_run, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("no_checkpoints")
  (workdir / "config.json").write_bytes((pathlib.Path(multi_run[0]) / "config.json").read_bytes())
  return str(workdir)


@pytest.mark.parametrize("tool,args,parts", [
    ("evaluate", ["--workdir", "{missing}"], ["does not exist"]),
    ("evaluate", ["--workdir", "{empty}"], ["holds no featdiv run (no config.json)"]),
    ("evaluate", ["--workdir", "{bare}"], ["has no checkpoint"]),
    ("evaluate", ["--workdir", "{multi}", "--step", "last"],
     ["step 'last' is not one of latest, best or a step number"]),
    ("evaluate", ["--workdir", "{multi}", "--step", "4"],
     ["has no checkpoint of step 4", "checkpoints: 3, 6"]),
    ("evaluate", ["--workdir", "{multi}", "--split", "dev"],
     ["dataset.eval_split='dev' is invalid", "train, test"]),
    ("evaluate", ["--workdir", "{multi}", "--batch", "12"], ["--batch 12", "data axis (8"]),
    ("evaluate", [], ["the following arguments are required: --workdir", "usage:"]),
    ("export", ["--workdir", "{multi}", "--head", "2", "--out", "{out}"],
     ["head 2 is out of range", "2 head(s) (0..1)"]),
    ("export", ["--workdir", "{multi}", "--step", "best", "--out", "{out}.pt"],
     ["expected a .safetensors file"]),
    ("export", ["--workdir", "{missing}", "--out", "{out}"], ["does not exist"]),
    ("export", ["--workdir", "{multi}", "--head", "one", "--out", "{out}"],
     ["argument --head: invalid int value: 'one'"]),
])
def test_a_mistake_is_one_line_and_writes_nothing(tool, args, parts, multi_run,
                                                  run_without_checkpoints, tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  names = dict(missing=tmp_path / "missing", empty=empty, bare=run_without_checkpoints,
               multi=multi_run[0], out=tmp_path / "head.safetensors")
  args = [a.format(**names) for a in args]
  watched = [multi_run[0], run_without_checkpoints, tmp_path]
  before = [snapshot(d) for d in watched]
  rc = {"evaluate": evaluate.main, "export": export.main}[tool](args)
  out, err = capsys.readouterr()
  assert rc == 1 and not out
  assert err.startswith("featdiv_jax: error: ") and err.count("\n") == 1, err
  for part in parts:
    assert part in err, (part, err)
  assert [snapshot(d) for d in watched] == before


def test_the_commands_run_as_modules_on_other_devices(multi_run, tmp_path):
  """`python -m` on one CPU device, for a run trained and saved on 8: evaluate restores into its
  own shardings and export onto its one device (orbax refuses to restore onto other devices
  without being told where)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(multi_run[0], workdir)
  out = str(tmp_path / "head1.safetensors")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  procs = [subprocess.Popen([sys.executable, "-m", f"featdiv_jax.{tool}", "--workdir", workdir,
                             *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for tool, args in (("evaluate", []), ("export", ["--head", "1", "--out", out]))]
  for proc in procs:
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    assert len(stdout.splitlines()) == 1 and "Traceback" not in stderr
  with open(os.path.join(workdir, "eval_test_6.json")) as f:
    got = json.load(f)
  want = multi_run[1]["history"][-1]
  assert got["mesh"] == [1, 1] and got["eval_count"] == 360
  # Other devices, other summation order: the same up to rounding.
  assert abs(got["eval_accuracy"] - want["eval_accuracy"]) <= 1 / 360
  np.testing.assert_allclose(got["eval_loss"], want["eval_loss"], rtol=1e-5)
  run = runs.load(multi_run[0])
  loaded = models.load_timm_weights(out, run.config.model.arch, stem=run.config.model.stem)
  assert_bitwise_equal(loaded, runs.head_variables(run, 1))
