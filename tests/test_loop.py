"""The training loop's device side (issue 16): uint8 batches normalised in the step, train metrics
accumulated inside the compiled step, batches prefetched onto the mesh, and `bench --e2e`.

Tiny model, 8 simulated CPU devices (tests/conftest.py). The loop's end-to-end behaviour (resume,
NaN stops, skipped steps, several processes) is covered by test_train, test_faults and
test_distributed, which run the same loop."""

import json

import jax
import numpy as np
import pytest

from featdiv_jax import bench, configlib, metrics, sharding, steps

SIZE, CLASSES, BATCH = 16, 3, 8


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def trainer():
  c = configlib.apply_arg(configlib.default_config(), "multi_cos,heads=2,smoke")
  c.model.stem, c.model.hidden, c.dataset.image_size = "cifar", 16, SIZE
  c.dataset.mean, c.dataset.std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
  c.skip_nonfinite = True
  mesh = sharding.make_mesh((-1, 1))
  return c, steps.make_trainer(c, CLASSES, mesh, total_steps=20,
                               metrics_fn=metrics.step_metrics,
                               accumulate_fn=metrics.accumulate, carry_fn=metrics.empty_carry)


def uint8_batches(n, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), np.uint8),
           "label": rng.integers(0, CLASSES, BATCH).astype(np.int32)} for _ in range(n)]


def normalised(batch, config):
  """What the data pipeline gave before issue 16: float32 images normalised on the host."""
  mean, std = np.asarray(config.dataset.mean), np.asarray(config.dataset.std)
  return dict(batch, image=((batch["image"] / 255.0 - mean) / std).astype(np.float32))


def test_uint8_batches_train_as_the_host_normalised_float_batches_did(trainer):
  config, t = trainer
  losses = {}
  for name, convert in (("uint8", lambda b: b), ("float", lambda b: normalised(b, config))):
    state = t.init_state(jax.random.key(0))
    out = []
    for b in uint8_batches(2):
      state, m, _ = t.train_step(state, sharding.global_batch(convert(b), t.batch_sharding))
      out.append(float(m["loss"]))
    losses[name] = out
  np.testing.assert_allclose(losses["uint8"], losses["float"], rtol=1e-5)
  assert losses["uint8"][0] != losses["uint8"][1]
  # eval: the same sums from uint8 and from float images
  state = t.init_state(jax.random.key(0))
  b = dict(uint8_batches(1, seed=1)[0], mask=np.ones(BATCH, bool))
  got = t.eval_step(state, sharding.global_batch(b, t.batch_sharding))
  want = t.eval_step(state, sharding.global_batch(normalised(b, config), t.batch_sharding))
  for key in ("loss_sum", "correct", "cosine_sum"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5)


def test_metrics_accumulated_in_the_step_equal_the_loops_eager_merge(trainer):
  config, t = trainer
  batches = uint8_batches(5)
  batches[3] = dict(batches[3], image=np.full((BATCH, SIZE, SIZE, 3), np.nan, np.float32))
  # eagerly, as the loop merged each step's clu metrics before issue 16
  state, eager = t.init_state(jax.random.key(0)), None
  for b in batches:
    state, _, summary = t.train_step(state, sharding.global_batch(b, t.batch_sharding))
    eager = metrics.merge(eager, summary)
  # inside the compiled step
  state, carry = t.init_state(jax.random.key(0)), t.make_carry()
  for b in batches:
    state, carry = t.loop_step(state, sharding.global_batch(b, t.batch_sharding), carry)
  for got in (carry.since_log, carry.since_eval):
    for key, want in eager.compute().items():
      np.testing.assert_allclose(got.compute()[key], want, rtol=1e-6, err_msg=key)
  assert int(carry.skipped) == 1  # step 4's NaN update was dropped (skip_nonfinite) ...
  assert metrics.first_bad(carry) is None  # ... so it is not an error
  assert eager.loss.count == 4


def test_the_carry_names_the_first_non_finite_step_and_keeps_it():
  carry = metrics.empty_carry()
  step = lambda loss, skipped=0.0: {**{k: np.float32(1.0) for k in metrics.AVERAGED},
                                    "loss": np.float32(loss), "learning_rate": np.float32(0.1),
                                    "skipped": np.float32(skipped)}
  carry = metrics.accumulate(carry, step(1.0), 1)
  carry = metrics.accumulate(carry, step(np.nan, skipped=1.0), 2)  # skipped: not an error
  assert metrics.first_bad(carry) is None
  carry = metrics.accumulate(carry, step(np.inf), 3)
  carry = metrics.accumulate(carry, step(np.nan), 4)
  assert metrics.first_bad(carry) == (3, "loss", np.inf)
  assert int(carry.skipped) == 1


def test_a_checkpointed_interval_average_continues_in_the_carry(trainer):
  _, t = trainer
  saved = {k: [6.0, 3.0] for k in metrics.AVERAGED}
  carry = t.make_carry(metrics.from_json(saved))
  assert jax.tree.map(lambda x: x.dtype, carry) == jax.tree.map(lambda x: x.dtype,
                                                               t.make_carry())
  assert float(carry.since_eval.compute()["loss"]) == 2.0
  assert metrics.to_json(carry.since_eval) == saved


def test_prefetch_puts_batches_on_the_mesh_ahead_in_order(trainer):
  _, t = trainer
  pulled = []

  def host():
    for i, b in enumerate(uint8_batches(6)):
      pulled.append(i)
      yield b

  it = sharding.prefetch(host(), t.batch_sharding)
  first = next(it)
  assert len(pulled) == 1 + sharding.PREFETCH  # batch 0 and the PREFETCH behind it
  got = [first] + list(it)
  assert len(got) == 6
  for g, want in zip(got, uint8_batches(6)):
    assert g["image"].sharding == t.batch_sharding and g["image"].dtype == np.uint8
    np.testing.assert_array_equal(g["image"], want["image"])


def test_bench_e2e_runs_the_loop_and_reports_its_ratio(tmp_path, capsys, digits_dir):
  path = tmp_path / "e2e.json"
  assert bench.main(["--e2e", "--config", "configs/digits.py:multi_cos,smoke", "--steps", "3",
                     "--rounds", "1", "--pipeline-batches", "2", "--data-dir", digits_dir,
                     "--json", str(path)]) == 0
  r = json.loads(path.read_text())
  assert r["arch"] == "seresnet_tiny" and len(r["rounds"]) == 1
  assert r["loop_over_step"] == pytest.approx(r["loop_img_per_s"] / r["step_img_per_s"])
  assert r["pipeline_cpu_ms_per_image"] > 0 and r["pipeline_img_per_s"] > 0
  out = capsys.readouterr().out
  assert "loop/step" in out and "CPU ms per image" in out


def test_bench_e2e_refuses_a_comparison(digits_dir):
  with pytest.raises(configlib.ConfigError, match=r"--e2e times one model.*digits\.py:multi_cos"):
    bench.main(["--e2e", "--config", "configs/digits.py", "--data-dir", digits_dir])


def test_a_bad_dataset_cache_is_refused_by_validation():
  c = configlib.default_config()
  c.dataset.cache = "disk"
  with pytest.raises(configlib.ConfigError, match=r"dataset\.cache.*'disk'.*auto, memory, none"):
    configlib.validate(c, jax.device_count())
