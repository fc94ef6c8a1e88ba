"""The (data, heads) mesh: shardings, and the same numbers on 1 and 8 simulated devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from featdiv_jax import checkpoint, configlib, sharding, steps


def test_resolve_mesh_shape():
  assert sharding.resolve_mesh_shape((-1, 1), 8) == (8, 1)
  assert sharding.resolve_mesh_shape((2, -1), 8) == (2, 4)
  assert sharding.resolve_mesh_shape((4, 2), 8) == (4, 2)
  for bad, match in [((3, -1), "3 does not divide the 8"), ((4, 4), "has 16 devices.*8"),
                     ((-1, -1), "at most one -1"), ((8,), "expected \\(data, heads\\)")]:
    with pytest.raises(sharding.MeshError, match=match):
      sharding.resolve_mesh_shape(bad, 8)


def tiny_config(num_heads):
  c = configlib.apply_arg(configlib.default_config(), f"multi_cos,heads={num_heads},smoke")
  c.model.stem = "cifar"
  c.dataset.image_size = 16
  c.model.dropout = 0.5
  return c


def run_steps(config, mesh_shape, devices, num_steps=2):
  trainer = steps.make_trainer(config, 10, sharding.make_mesh(mesh_shape, devices=devices),
                               total_steps=10)
  state, train, batch_sh = (trainer.init_state(jax.random.key(0)), trainer.train_step,
                            trainer.batch_sharding)
  rng = np.random.default_rng(0)
  history = []
  for _ in range(num_steps):
    local = {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 10, size=8).astype(np.int32)}
    state, metrics = train(state, sharding.global_batch(local, batch_sh))
    history.append(jax.device_get(metrics))
  return state, history, trainer.state_shardings


def test_eight_devices_match_one_device_for_every_mesh_shape():
  assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
  config = tiny_config(4)
  ref_state, ref_hist, _ = run_steps(config, (1, 1), jax.devices()[:1])
  for shape in [(8, 1), (4, 2), (2, 4)]:
    state, hist, shardings = run_steps(config, shape, jax.devices())
    for ref, got in zip(ref_hist, hist):
      for k in ("loss", "cross_entropy", "penalty", "accuracy"):
        np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=1e-6, err_msg=f"{shape} {k}")
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
                 jax.device_get(state.params), jax.device_get(ref_state.params))
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
                 jax.device_get(state.batch_stats), jax.device_get(ref_state.batch_stats))
    kernel = state.params["heads"]["conv1"]["kernel"]
    assert kernel.sharding.spec == (jax.sharding.PartitionSpec("heads") if shape[1] > 1
                                    else jax.sharding.PartitionSpec())
    assert len({s.device for s in kernel.addressable_shards}) == 8


def test_optimizer_moments_follow_the_head_sharding():
  config = tiny_config(4)
  shardings = steps.make_trainer(config, 10, sharding.make_mesh((2, 4)),
                                total_steps=10).state_shardings
  specs = {jax.tree_util.keystr(p): s.spec
           for p, s in jax.tree.leaves_with_path(shardings)}
  heads = [k for k in specs if "'heads'" in k]
  others = [k for k in specs if "'heads'" not in k]
  assert heads and all(specs[k] == jax.sharding.PartitionSpec("heads") for k in heads)
  assert any("mu" in k for k in heads) and any("batch_stats" in k for k in heads)
  assert all(specs[k] == jax.sharding.PartitionSpec() for k in others)


def test_runs_that_differ_only_in_their_seed_share_one_compiled_step():
  texts = []
  for seed in (0, 1, 2**40 + 3):
    config = tiny_config(2)
    config.seed = seed
    trainer = steps.make_trainer(config, 10, sharding.make_mesh((8, 1)), total_steps=10)
    state = checkpoint.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
    batch = {"image": jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32,
                                           sharding=trainer.batch_sharding),
             "label": jax.ShapeDtypeStruct((8,), jnp.int32, sharding=trainer.batch_sharding)}
    texts.append(trainer.train_step.lower(state, batch).as_text())
  assert texts[0] == texts[1] == texts[2]
