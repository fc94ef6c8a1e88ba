"""SE-ResNet architecture, multi-head network and frozen heads."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from featdiv_jax import configlib, models, steps
from featdiv_jax.models import (create_model, create_multihead, extract_head, place_head,
                                se_reduced_width)
from featdiv_jax.optim import freeze_heads

# timm 1.0.x parameter counts (docs/reference.md): classes -> count.
TIMM_PARAMS = {
    "seresnet18": {1000: 11_779_624, 10: 11_271_754, 102: 11_318_950},
    "seresnet34": {1000: 21_960_416, 10: 21_452_546, 102: 21_499_742},
    "seresnet50": {1000: 28_088_024, 10: 26_059_514, 102: 26_248_022},
    "seresnet101": {1000: 49_326_872, 10: 47_298_362, 102: 47_486_870},
    "seresnet152": {1000: 66_821_848, 10: 64_793_338, 102: 64_981_846},
}


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_init(model, size=64):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))


@pytest.mark.parametrize("arch", sorted(TIMM_PARAMS))
@pytest.mark.parametrize("num_classes", [1000, 10, 102])
def test_param_counts_match_timm(arch, num_classes):
  variables = abstract_init(create_model(arch, num_classes))
  assert count(variables["params"]) == TIMM_PARAMS[arch][num_classes]


@pytest.mark.parametrize("num_classes", [10, 1000])
def test_single_head_multihead_has_timm_param_count(num_classes):
  net = create_multihead("seresnet18", 1, num_classes, classifier="pool_linear")
  assert count(abstract_init(net)["params"]) == TIMM_PARAMS["seresnet18"][num_classes]


def test_se_reduced_widths_match_timm():
  assert [se_reduced_width(c) for c in (64, 128, 256, 512, 1024, 2048)] == [8, 8, 16, 32, 64, 128]


@pytest.mark.parametrize("arch,stem,size,expected", [
    ("seresnet_tiny", "imagenet", 64, (2, 2, 2, 64)),
    ("seresnet_tiny", "imagenet", 45, (2, 2, 2, 64)),   # 45 -> 23 -> 12 -> 12, 6, 3, 2
    ("seresnet_tiny", "cifar", 32, (2, 4, 4, 64)),
    ("seresnet_tiny_bottleneck", "cifar", 32, (2, 4, 4, 256)),
    ("seresnet_tiny_bottleneck", "imagenet", 224, (2, 7, 7, 256)),
])
def test_feature_map_shapes_for_both_stems(arch, stem, size, expected):
  model = create_model(arch, 0, stem=stem)
  x = jnp.zeros((2, size, size, 3))
  features = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x)[0])
  assert features.shape == expected
  logits = jax.eval_shape(lambda: create_model(arch, 7, stem=stem).init_with_output(
      jax.random.key(0), x)[0])
  assert logits.shape == (2, 7)


def test_stride_two_convs_pad_symmetrically_like_torch():
  params = abstract_init(create_model("seresnet_tiny", 3))["params"]
  assert params["conv1"]["kernel"].shape == (7, 7, 3, 8)
  model = create_model("seresnet_tiny", 0)
  # With torch's symmetric padding a 45-pixel input gives a 23-pixel map after the stem conv;
  # "SAME" would too, but pads (2, 3) instead of (3, 3): checked numerically by the timm parity
  # test. Here: the block structure (downsample only where shape changes).
  assert "downsample_conv" not in params["layer1_0"]
  assert all("downsample_conv" in params[f"layer{i}_0"] for i in (2, 3, 4))
  bottleneck = abstract_init(create_model("seresnet_tiny_bottleneck", 3))["params"]
  assert "downsample_conv" in bottleneck["layer1_0"]   # 8 -> 32 channels at stride 1
  del model


def test_last_batchnorm_of_each_block_starts_at_zero():
  variables = jax.jit(create_model("seresnet_tiny", 3).init)(jax.random.key(0),
                                                             jnp.ones((1, 32, 32, 3)))
  p = variables["params"]
  for i in range(1, 5):
    np.testing.assert_array_equal(p[f"layer{i}_0"]["bn2"]["scale"], 0.0)
    np.testing.assert_array_equal(p[f"layer{i}_0"]["bn1"]["scale"], 1.0)


def test_bfloat16_compute_keeps_float32_params():
  model = create_model("seresnet_tiny", 4, stem="cifar", dtype="bfloat16")
  x = jnp.ones((2, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  _, inter = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))(variables, x)
  assert inter["intermediates"]["features"][0].dtype == jnp.bfloat16
  logits = jax.jit(model.apply)(variables, x)
  assert logits.dtype == jnp.float32
  ref = jax.jit(create_model("seresnet_tiny", 4, stem="cifar").apply)(variables, x)
  np.testing.assert_allclose(logits, ref, atol=5e-2)


def test_batchnorm_matches_torch_training_semantics():
  x = jax.random.normal(jax.random.key(1), (4, 3, 3, 5)) * 2 + 1
  bn = models.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), x)
  y, upd = bn.apply(variables, x, mutable=["batch_stats"])
  xs = np.asarray(x).reshape(-1, 5)
  np.testing.assert_allclose(y.reshape(-1, 5), (xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5),
                             atol=1e-5)
  # torch: running = 0.9 * running + 0.1 * batch, with the unbiased variance.
  np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * xs.mean(0), rtol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * xs.var(0, ddof=1), rtol=1e-5)


def test_unknown_arch_and_options_are_named():
  with pytest.raises(ValueError, match="unknown arch 'resnet9'.*seresnet18"):
    create_model("resnet9", 10)
  with pytest.raises(ValueError, match="unknown model option.*'depth'"):
    create_model("seresnet18", 10, depth=3)
  with pytest.raises(ValueError, match="stem='vit'"):
    abstract_init(create_model("seresnet_tiny", 10, stem="vit"))
  with pytest.raises(ValueError, match="frozen_heads.*\\[2\\].*num_heads=2"):
    create_multihead("seresnet_tiny", 2, 10, frozen_heads=(2,))
  with pytest.raises(ValueError, match="unknown fusion 'mean'"):
    create_multihead("seresnet_tiny", 2, 10, fusion="mean")
  with pytest.raises(ValueError, match="unknown classifier 'svm'.*flatten_mlp"):
    create_multihead("seresnet_tiny", 2, 10, classifier="svm")


# ---- multi-head network ----

X = np.random.default_rng(42).normal(size=(4, 32, 32, 3)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _init_multi(num_heads, kw):
  kw = dict(kw)
  kw.setdefault("stem", "cifar")
  net = create_multihead("seresnet_tiny", num_heads, 10, **kw)
  return net, jax.jit(net.init)(jax.random.key(0), X)


def init_multi(num_heads=3, **kw):
  """(net, variables), built once per distinct arguments (init compiles slowly on XLA:CPU)."""
  return _init_multi(num_heads, tuple(sorted(kw.items())))


def test_heads_are_one_vmapped_module_with_stacked_distinct_params():
  net, variables = init_multi(3)
  heads = variables["params"]["heads"]
  assert set(variables["params"]) == {"heads", "hidden", "fc"}
  for leaf in jax.tree.leaves(heads):
    assert leaf.shape[0] == 3
  kernel = heads["layer1_0"]["conv1"]["kernel"]
  assert not np.allclose(kernel[0], kernel[1]) and not np.allclose(kernel[1], kernel[2])
  assert jax.tree.leaves(variables["batch_stats"]["heads"])[0].shape[0] == 3
  (logits, features) = jax.jit(net.apply)(variables, X)
  assert logits.shape == (4, 10) and features.shape == (3, 4, 4, 4, 64)
  assert not np.allclose(features[0], features[1])


def test_slicing_a_head_reproduces_a_standalone_backbone():
  net, variables = init_multi(3)
  _, features = jax.jit(net.apply)(variables, X)
  single = jax.jit(create_model("seresnet_tiny", 0, stem="cifar").apply)
  for k in range(3):
    np.testing.assert_allclose(single(extract_head(variables, k), X), features[k], atol=1e-6)


@pytest.mark.parametrize("fusion,classifier,width", [
    ("concat", "flatten_mlp", 4 * 4 * 128), ("sum", "flatten_mlp", 4 * 4 * 64),
    ("concat", "pool_linear", 128), ("sum", "pool_mlp", 64), ("concat", "pool_mlp", 128)])
def test_fusion_and_classifier_variants(fusion, classifier, width):
  net, variables = init_multi(2, fusion=fusion, classifier=classifier)
  first = variables["params"]["fc" if classifier == "pool_linear" else "hidden"]["kernel"]
  assert first.shape[0] == width
  apply = jax.jit(functools.partial(net.apply, train=True, mutable=["batch_stats"]))
  logits, _ = apply(variables, X, rngs={"dropout": jax.random.key(1)})[0]
  assert logits.shape == (4, 10)


def test_concat_fusion_is_head_major_channels():
  f = jnp.arange(2 * 1 * 1 * 1 * 3, dtype=jnp.float32).reshape(2, 1, 1, 1, 3)
  np.testing.assert_array_equal(models.fuse(f, "concat")[0, 0, 0], [0, 1, 2, 3, 4, 5])
  np.testing.assert_array_equal(models.fuse(f, "sum")[0, 0, 0], [3, 5, 7])


def test_one_head_pool_linear_is_exactly_the_single_seresnet():
  single = create_model("seresnet_tiny", 10, stem="cifar")
  sv = jax.jit(single.init)(jax.random.key(7), X)
  # give BN non-trivial statistics and the last BNs non-zero gammas
  sv = jax.tree.map(lambda a: a + 0.3 * jax.random.uniform(jax.random.key(3), a.shape), sv)
  net, mv = init_multi(1, classifier="pool_linear")
  mv = place_head(mv, sv, 0)
  mv["params"]["fc"] = sv["params"]["fc"]
  logits, _ = jax.jit(net.apply)(mv, X)
  np.testing.assert_allclose(logits, jax.jit(single.apply)(sv, X), atol=1e-5)


@pytest.mark.parametrize("frozen", [(), (0,)])
def test_one_head_trains_like_the_single_seresnet_without_a_size_one_vmap(frozen):
  """K=1 keeps the stacked variables but skips nn.vmap: same loss, gradients, BN updates."""
  single = create_model("seresnet_tiny", 10, stem="cifar")
  sv = jax.jit(single.init)(jax.random.key(7), X)
  sv = jax.tree.map(lambda a: a + 0.3 * jax.random.uniform(jax.random.key(3), a.shape), sv)
  net = create_multihead("seresnet_tiny", 1, 10, classifier="pool_linear", stem="cifar",
                         frozen_heads=frozen)
  mv = place_head(jax.jit(net.init)(jax.random.key(0), X), sv, 0)
  mv["params"]["fc"] = sv["params"]["fc"]
  y = np.arange(X.shape[0]) % 10

  def multi_loss(params):
    (logits, feats), new = net.apply({"params": params, "batch_stats": mv["batch_stats"]}, X,
                                     True, mutable=["batch_stats"])
    assert feats.shape[0] == 1
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

  def single_loss(params):  # a frozen head normalises with its running statistics
    logits, new = single.apply({"params": params, "batch_stats": sv["batch_stats"]}, X,
                               not frozen, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

  (lm, newm), gm = jax.jit(jax.value_and_grad(multi_loss, has_aux=True))(mv["params"])
  (ls, news), gs = jax.jit(jax.value_and_grad(single_loss, has_aux=True))(sv["params"])
  np.testing.assert_allclose(lm, ls, rtol=1e-6)
  close = functools.partial(np.testing.assert_allclose, atol=1e-5, rtol=1e-5)
  jax.tree.map(close, gm["fc"], gs["fc"])
  head_grads = jax.tree.map(lambda a: a[0], gm["heads"])
  if frozen:  # a frozen head passes no gradient and keeps its statistics
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(head_grads))
    jax.tree.map(np.testing.assert_array_equal, newm["batch_stats"], mv["batch_stats"])
  else:
    jax.tree.map(close, head_grads, {k: v for k, v in gs.items() if k != "fc"})
    jax.tree.map(close, extract_head(newm, 0)["batch_stats"], news["batch_stats"])
  dots = [l for l in jax.jit(multi_loss).lower(mv["params"]).as_text().splitlines()
          if "dot_general" in l]
  assert dots and not any("batching_dims" in l for l in dots)  # no size-1 vmap left


def test_place_head_rejects_a_different_arch():
  _, mv = init_multi(2)
  ov = abstract_init(create_model("seresnet_tiny_bottleneck", 10, stem="cifar"))
  with pytest.raises(ValueError, match="do not match|expects"):
    place_head(mv, ov, 1)
  with pytest.raises(ValueError, match="head index 2"):
    place_head(mv, ov, 2)


@functools.partial(jax.jit, static_argnums=(0, 1))
def train_step(net, tx, variables, opt_state, x, y):
  def loss_fn(params):
    (logits, _), upd = net.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                 x, True, mutable=["batch_stats"],
                                 rngs={"dropout": jax.random.key(0)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
  (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
  updates, opt_state = tx.update(grads, opt_state, variables["params"])
  params = optax.apply_updates(variables["params"], updates)
  return {"params": params, "batch_stats": upd["batch_stats"]}, opt_state, grads


def test_frozen_heads_keep_params_and_batch_stats_through_a_step():
  net, variables = init_multi(3, frozen_heads=(1,))
  # a frozen pretrained head has non-trivial running statistics
  variables = jax.tree.map(lambda a: a + 0.1, variables)
  tx = optax.chain(optax.adamw(1e-2, weight_decay=0.1), freeze_heads((1,)))
  opt_state = tx.init(variables["params"])
  y = jnp.arange(4) % 10
  new, _, grads = train_step(net, tx, variables, opt_state, X, y)
  for col in ("params", "batch_stats"):
    for old, cur in zip(jax.tree.leaves(variables[col]["heads"]),
                        jax.tree.leaves(new[col]["heads"])):
      np.testing.assert_array_equal(old[1], cur[1])
      assert not np.array_equal(old[0], cur[0])
  assert all(not np.any(g[1]) for g in jax.tree.leaves(grads["heads"]))
  # a frozen head normalises with its running statistics even in training
  train_apply = jax.jit(functools.partial(net.apply, train=True, mutable=["batch_stats"]))
  _, f_train = train_apply(variables, X, rngs={"dropout": jax.random.key(0)})[0]
  _, f_eval = jax.jit(net.apply)(variables, X)
  np.testing.assert_allclose(f_train[1], f_eval[1], atol=1e-5)
  assert not np.allclose(f_train[0], f_eval[0], atol=1e-3)


def test_frozen_bn_batch_normalises_with_the_batch_and_updates_running_stats_only():
  """The notebooks' frozen head (model.frozen_bn="batch"): BatchNorm in train mode, running
  statistics updating, but no gradient and parameters bit-identical through a step."""
  net, variables = init_multi(2, frozen_heads=(1,))
  net = net.clone(frozen_bn="batch")
  variables = jax.tree.map(lambda a: a + 0.1, variables)
  tx = optax.chain(optax.adamw(1e-2, weight_decay=0.1), freeze_heads((1,)))
  new, _, grads = train_step(net, tx, variables, tx.init(variables["params"]), X,
                             jnp.arange(4) % 10)
  for old, cur in zip(jax.tree.leaves(variables["params"]["heads"]),
                      jax.tree.leaves(new["params"]["heads"])):
    np.testing.assert_array_equal(old[1], cur[1])
  assert all(not np.any(g[1]) for g in jax.tree.leaves(grads["heads"]))
  # head 1's running statistics moved, as head 0's did
  for old, cur in zip(jax.tree.leaves(variables["batch_stats"]["heads"]),
                      jax.tree.leaves(new["batch_stats"]["heads"])):
    assert not np.array_equal(old[1], cur[1]) and not np.array_equal(old[0], cur[0])
  # in training the frozen head normalises with the batch: its features are a train-mode
  # SE-ResNet's on its own variables, not those of the running statistics
  train_apply = jax.jit(functools.partial(net.apply, train=True, mutable=["batch_stats"]))
  _, f_train = train_apply(variables, X, rngs={"dropout": jax.random.key(0)})[0]
  single = create_model("seresnet_tiny", 0, stem="cifar")
  f_single = jax.jit(functools.partial(single.apply, train=True, mutable=["batch_stats"]))(
      extract_head(variables, 1), X)[0]
  np.testing.assert_allclose(f_train[1], f_single, rtol=1e-5, atol=1e-5)
  _, f_eval = jax.jit(net.apply)(variables, X)
  assert not np.allclose(f_train[1], f_eval[1], atol=1e-3)
  # the config field is what builds it
  config = configlib.default_config()
  config.model.frozen_bn = "batch"
  assert steps.build_model(config.model, 10).frozen_bn == "batch"
  with pytest.raises(ValueError, match="frozen_bn='train'; valid: running, batch"):
    create_multihead("seresnet_tiny", 2, 10, frozen_bn="train")


def test_freeze_heads_passes_through_when_nothing_is_frozen():
  updates = {"heads": {"w": jnp.ones((2, 3))}, "fc": {"w": jnp.ones(3)}}
  out, _ = freeze_heads(()).update(updates, optax.EmptyState())
  assert out is updates
  out, _ = freeze_heads((0,)).update(
      {"heads": {"w": jnp.full((2, 3), jnp.nan)}, "fc": {"w": jnp.ones(3)}}, optax.EmptyState())
  np.testing.assert_array_equal(out["heads"]["w"][0], 0.0)
  assert np.isnan(out["heads"]["w"][1]).all()
  np.testing.assert_array_equal(out["fc"]["w"], 1.0)


@pytest.mark.parametrize("arch,stem,size", [("seresnet_tiny", "imagenet", 45),
                                            ("seresnet_tiny", "imagenet", 32),  # 2x2 and 1x1 maps
                                            ("seresnet_tiny_bottleneck", "cifar", 16)])
def test_im2col_convolutions_equal_xla_convolutions(arch, stem, size):
  x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  y = np.array([1, 3])
  xla = create_model(arch, 5, stem=stem, conv_impl="xla")
  patches = create_model(arch, 5, stem=stem, conv_impl="im2col")
  variables = jax.jit(xla.init)(jax.random.key(0), x)
  variables = jax.tree.map(lambda a: a + 0.2, variables)  # non-zero last-BN gammas

  def loss(model, params):
    logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                            True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  for a, b in [(jax.jit(xla.apply)(variables, x), jax.jit(patches.apply)(variables, x)),
               (jax.jit(jax.grad(functools.partial(loss, xla)))(variables["params"]),
                jax.jit(jax.grad(functools.partial(loss, patches)))(variables["params"]))]:
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=2e-5, rtol=1e-4), a, b)


@pytest.mark.parametrize("size,kernel,stride,pad,taps", [
    (1, 3, 1, 1, 1),  # a 3x3 conv on a 1x1 map: only the centre reads data
    (2, 3, 2, 1, 4),  # 3x3/2 from 2x2 to 1x1: the bottom-right 2x2 offsets
    (2, 3, 1, 1, 9), (5, 3, 2, 1, 9), (1, 7, 2, 3, 1), (3, 7, 2, 3, 25)])
def test_patch_conv_leaves_out_offsets_that_only_read_padding(size, kernel, stride, pad, taps):
  from featdiv_jax.models.resnet import PatchConv
  x = np.random.default_rng(1).normal(size=(2, size, size, 3)).astype(np.float32)
  conv = PatchConv(4, (kernel, kernel), stride, pad)
  ref = nn.Conv(4, (kernel, kernel), stride, padding=pad, use_bias=False)
  params = ref.init(jax.random.key(0), x)
  np.testing.assert_allclose(conv.apply(params, x), ref.apply(params, x), atol=1e-5)
  grads = [jax.grad(lambda p, m=m: jnp.sum(jnp.sin(m.apply(p, x))))(params) for m in (conv, ref)]
  np.testing.assert_allclose(grads[0]["params"]["kernel"], grads[1]["params"]["kernel"],
                             atol=1e-5)
  dots = [e for e in jax.make_jaxpr(conv.apply)(params, x).jaxpr.eqns
          if e.primitive.name == "dot_general"]
  assert [d.invars[0].aval.shape[-1] for d in dots] == [taps * 3]  # contraction: taps x channels


def test_conv_impl_auto_picks_im2col_on_cpu_and_rejects_unknown():
  assert models.backbone_fields("seresnet18")["conv_impl"] == "im2col"  # tests run on CPU
  with pytest.raises(ValueError, match="conv_impl='fft'"):
    abstract_init(create_model("seresnet_tiny", 3, conv_impl="fft"))


@pytest.mark.parametrize("capability, expected", [
    ("7.0", jnp.float32), ("7.5", jnp.float32),      # V100, T4: bfloat16 emulated, slower
    ("8.0", jnp.bfloat16), ("9.0", jnp.bfloat16), ("10.0", jnp.bfloat16),
    ("gfx90a", jnp.bfloat16)])
def test_dtype_auto_needs_bfloat16_tensor_cores_on_gpus(monkeypatch, capability, expected):
  class Device:
    compute_capability = capability
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda *args: [Device()])
  assert models.backbone_fields("seresnet18", dtype="auto")["dtype"] == expected


def test_dtype_auto_is_float32_on_cpu_and_bfloat16_on_accelerators(monkeypatch):
  assert models.backbone_fields("seresnet18", dtype="auto")["dtype"] == jnp.float32
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert models.backbone_fields("seresnet18", dtype="auto")["dtype"] == jnp.bfloat16
  assert models.backbone_fields("seresnet18", dtype="float32")["dtype"] == jnp.float32
