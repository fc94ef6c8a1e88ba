"""Stochastic depth (`model.drop_path`): timm's DropPath on every block's residual branch."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from featdiv_jax import models, sharding
from featdiv_jax.models import DropPath, create_model, create_multihead, drop_path_rates

X = np.random.default_rng(0).normal(size=(8, 16, 16, 3)).astype(np.float32)
RATE = 0.5


def multihead(drop_path=None, **kw):
  """2 heads of 3 blocks (drop path rates 0, RATE / 2, RATE: none, one on a block without and
  one on a block with a downsampling shortcut), quick to compile; no classifier dropout, so
  only drop path draws from the rng."""
  kw = dict(stem="cifar", stage_sizes=(2, 1), widths=(8, 16), dropout=0.0, **kw)
  if drop_path is not None:
    kw["drop_path"] = drop_path
  return create_multihead("seresnet_tiny", 2, 10, **kw)


@functools.lru_cache(maxsize=None)
def variables(same_heads=False, heads_impl="vmap"):
  """Random values in the variables' shapes, without an init to compile. (An init's last
  BatchNorm of each block has scale 0, which would make every residual branch, so drop path,
  vanish.) With `same_heads`, both heads hold head 0's values."""
  abstract = jax.eval_shape(multihead(heads_impl=heads_impl).init, jax.random.key(0), X)
  rng = np.random.default_rng(1)

  def leaf(path, a):
    if jax.tree_util.keystr(path).startswith("['params']"):
      return (0.3 * rng.normal(size=a.shape)).astype(a.dtype)
    return rng.uniform(0.5, 1.5, size=a.shape).astype(a.dtype)

  out = jax.tree.map_with_path(leaf, abstract)
  if same_heads:
    out = {col: dict(tree, heads=jax.tree.map(lambda a: np.stack([a[0]] * 2), tree["heads"]))
           for col, tree in out.items()}
  return out


@functools.partial(jax.jit, static_argnums=(0, 3))
def features(net, variables, x, train, rng):
  (_, feats), _ = net.apply(variables, x, train, mutable=["batch_stats"],
                            rngs={"dropout": rng})
  return feats


def test_rates_follow_timms_linear_rule():
  # timm's make_blocks: drop_path_rate * net_block_idx / (net_num_blocks - 1), seresnet18: 8.
  assert drop_path_rates(0.1, 8) == tuple(0.1 * i / (8 - 1) for i in range(8))
  assert drop_path_rates(0.1, 8)[0] == 0.0 and drop_path_rates(0.1, 8)[-1] == 0.1
  assert drop_path_rates(0.0, 4) == (0.0,) * 4
  assert drop_path_rates(0.3, 1) == (0.0,)
  # The blocks of seresnet18 get them in order, and a rate-0 block (the first) no DropPath.
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, DropPath) and context.method_name == "__call__":
      seen.append((context.module.scope.path[0], context.module.rate))
    return next_fun(*args, **kwargs)

  model = create_model("seresnet18", 10, drop_path=0.1)
  x = jnp.zeros((2, 32, 32, 3))
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)
  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(model.apply, train=True, mutable=["batch_stats"]),
                   abstract, x, rngs={"dropout": jax.random.key(1)})
  blocks = [f"layer{i}_{j}" for i in range(1, 5) for j in range(2)]
  assert seen == list(zip(blocks, drop_path_rates(0.1, 8)))[1:]


def test_zero_rate_is_the_model_without_it_and_adds_no_operation():
  assert multihead(0.0) == multihead()
  assert create_model("seresnet_tiny", 0, drop_path=0.0) == create_model("seresnet_tiny", 0)
  # DropPath has no variables: the same tree whatever the rate.
  shapes = [jax.tree.map(lambda a: (a.shape, a.dtype), jax.eval_shape(
      multihead(rate).init, jax.random.key(0), X)) for rate in (0.0, RATE)]
  assert shapes[0] == shapes[1]
  vs = variables()
  rng = jax.random.key(3)
  np.testing.assert_array_equal(features(multihead(0.0), vs, X, True, rng),
                                features(multihead(), vs, X, True, rng))

  def random_draws(rate):
    jaxpr = jax.make_jaxpr(lambda v, x, key: multihead(rate).apply(
        v, x, True, mutable=["batch_stats"], rngs={"dropout": key}))(vs, X, rng)
    return str(jaxpr).count("random_bits")

  assert random_draws(0.0) == 0 and random_draws(RATE) > 0


def test_eval_mode_is_the_identity():
  vs = variables()
  rng = jax.random.key(3)
  np.testing.assert_array_equal(features(multihead(RATE), vs, X, False, rng),
                                features(multihead(0.0), vs, X, False, rng))


def test_train_mode_drops_paths_deterministically_per_rng():
  vs = variables()
  net = multihead(RATE)
  a, b = jax.random.key(3), jax.random.key(4)
  dropped = np.asarray(features(net, vs, X, True, a))
  assert not np.allclose(dropped, features(multihead(0.0), vs, X, True, a))
  assert not np.allclose(dropped, features(net, vs, X, True, b))
  np.testing.assert_array_equal(dropped, features(net, vs, X, True, a))


@pytest.mark.parametrize("heads_impl,conv_impl", [("vmap", "im2col"), ("loop", "im2col"),
                                                  ("vmap", "xla")])
def test_heads_draw_their_own_masks(heads_impl, conv_impl):
  """Two heads with the same variables compute the same features, except for drop path: the
  vmap (im2col), the separate modules (loop) and the heads in turn (XLA's convolutions)."""
  vs = variables(same_heads=heads_impl == "vmap", heads_impl=heads_impl)
  if heads_impl == "loop":
    vs = {col: dict(tree, head_1=tree["head_0"]) for col, tree in vs.items()}
  rng = jax.random.key(5)
  net = multihead(RATE, heads_impl=heads_impl, conv_impl=conv_impl)
  feats = features(net, vs, X, True, rng)
  assert not np.allclose(feats[0], feats[1])
  if heads_impl == "vmap" and conv_impl == "im2col":  # the same heads without drop path agree
    same = features(multihead(0.0), vs, X, True, rng)
    np.testing.assert_allclose(same[0], same[1], rtol=1e-6, atol=1e-6)


def test_heads_on_different_device_groups_draw_their_own_masks():
  """XLA's convolutions over a `heads` mesh axis: each device group runs its heads in turn
  under a shard_map, whose dropout rng gets the group's index folded in (else both groups'
  first heads would share masks)."""
  mesh = sharding.make_mesh((1, 2), devices=jax.devices()[:2])
  vs = variables(same_heads=True)
  vs = jax.device_put(vs, sharding.state_shardings(mesh, vs, 2))
  x = jax.device_put(X, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  feats = features(multihead(RATE, conv_impl="xla"), vs, x, True, jax.random.key(5))
  assert feats.sharding.spec[0] == "heads"  # the shard_map path
  assert not np.allclose(feats[0], feats[1])


@pytest.mark.parametrize("frozen_bn", ["running", "batch"])
def test_frozen_heads_drop_no_paths(frozen_bn):
  """Head 1 frozen: its features are those it computes without drop path (in eval mode for
  running statistics, in train mode for the batch's); head 0 still drops paths."""
  vs = variables()
  rng = jax.random.key(6)
  feats = features(multihead(RATE, frozen_heads=(1,), frozen_bn=frozen_bn), vs, X, True, rng)
  plain = features(multihead(0.0), vs, X, frozen_bn == "batch", rng)
  np.testing.assert_allclose(feats[1], plain[1], rtol=1e-5, atol=1e-6)
  if frozen_bn == "batch":
    assert not np.allclose(feats[0], plain[0])


def test_drop_path_module_is_unbiased_per_example_and_identity_in_eval():
  x = np.random.default_rng(2).normal(size=(16, 2, 2, 3)).astype(np.float32)
  layer = DropPath(0.3)

  @jax.jit
  @jax.vmap
  def apply(key):
    return layer.apply({}, x, deterministic=False, rngs={"dropout": key})

  keys = jax.random.split(jax.random.key(7), 4000)
  out = np.asarray(apply(keys))
  scale = out / x  # each example is kept (x 1 / 0.7) or dropped (x 0) as a whole
  assert np.allclose(scale, scale[:, :, :1, :1, :1], atol=1e-5)
  np.testing.assert_allclose(np.unique(np.round(scale, 4)), [0.0, 1 / 0.7], atol=1e-4)
  assert abs(np.mean(scale == 0) - 0.3) < 0.01
  np.testing.assert_allclose(out.mean(0), x, atol=0.1 * np.abs(x).max())
  np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(DropPath(0.0).apply({}, x, deterministic=False), x)


def test_rate_must_be_a_fraction():
  with pytest.raises(ValueError, match="drop_path=1.0"):
    create_model("seresnet_tiny", 0, drop_path=1.0)
  with pytest.raises(ValueError, match="drop_path=-0.1"):
    multihead(-0.1)
  assert models.backbone_fields("seresnet_tiny", drop_path=0.2)["drop_path"] == 0.2
