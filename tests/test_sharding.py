"""The (data, heads) mesh: shardings, and the same numbers on 1 and 8 simulated devices."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from featdiv_jax import configlib, sharding, steps


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
  c.model.dropout = 0.5
  return c


def run_steps(config, mesh_shape, devices, num_steps=2):
  mesh = sharding.make_mesh(mesh_shape, devices=devices)
  model = steps.build_model(config.model, 10)
  tx = steps.make_optimizer(config.optimizer, 10)
  init = functools.partial(steps.init_state, model, tx, image_size=16)
  abstract = jax.eval_shape(init, jax.random.key(0))
  state_sh = sharding.state_shardings(mesh, abstract, config.model.num_heads)
  batch_sh = sharding.batch_sharding(mesh)
  state = jax.jit(init, out_shardings=state_sh)(jax.random.key(0))
  train = jax.jit(steps.bind_train_step(model, tx, config),
                  in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                  donate_argnums=0)
  rng = np.random.default_rng(0)
  history = []
  for _ in range(num_steps):
    local = {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 10, size=8).astype(np.int32)}
    state, metrics = train(state, sharding.global_batch(local, batch_sh))
    history.append(jax.device_get(metrics))
  return state, history, state_sh


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
  mesh = sharding.make_mesh((2, 4))
  model = steps.build_model(config.model, 10)
  tx = steps.make_optimizer(config.optimizer, 10)
  abstract = jax.eval_shape(functools.partial(steps.init_state, model, tx, image_size=16),
                            jax.random.key(0))
  shardings = sharding.state_shardings(mesh, abstract, 4)
  specs = {jax.tree_util.keystr(p): s.spec
           for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
  heads = [k for k in specs if "'heads'" in k]
  others = [k for k in specs if "'heads'" not in k]
  assert heads and all(specs[k] == jax.sharding.PartitionSpec("heads") for k in heads)
  assert any("mu" in k for k in heads) and any("batch_stats" in k for k in heads)
  assert all(specs[k] == jax.sharding.PartitionSpec() for k in others)
