"""The recipe fields of issue 17, each against an independent computation: label smoothing,
gradient clipping (and the grad_norm metric), the EMA, gradient accumulation, weight decay without
norms and biases, and mixup / cutmix. (Random resized crops: test_random_resized.py; stochastic
depth: test_drop_path.py; validation: test_validation.py; resume with all of them on:
test_train.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from featdiv_jax import configlib, optim, sharding, steps

NUM_CLASSES = 4
SIZE = 8
BATCH = 16
LR = 0.5


def tiny_config(**fields):
  """Two heads, CIFAR stem, plain SGD (update = -LR * gradient) without dropout or decay."""
  c = configlib.apply_arg(configlib.default_config(), "multi_cos,heads=2,smoke")
  c.model.stem, c.model.hidden, c.model.dropout = "cifar", 16, 0.0
  c.dataset.image_size = SIZE
  c.batch_size = BATCH
  c.optimizer.name, c.optimizer.momentum, c.optimizer.weight_decay = "sgd", 0.0, 0.0
  c.optimizer.schedule, c.optimizer.learning_rate = "constant", LR
  for field, value in fields.items():
    configlib.override(c, field, value)
  return c


def build(config, num_devices=2):
  configlib.validate(config, num_devices)
  mesh = sharding.make_mesh((-1, 1), devices=jax.devices()[:num_devices])
  return steps.make_trainer(config, NUM_CLASSES, mesh, total_steps=10)


def random_batch(seed):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32),
          "label": rng.integers(0, NUM_CLASSES, size=BATCH).astype(np.int32)}


def one_step(trainer, batch, state=None):
  """(state before, state after, metrics) of one train step, all as host values."""
  state = trainer.init_state(jax.random.key(0)) if state is None else state
  before = jax.device_get(state)
  after, metrics = trainer.train_step(state, sharding.global_batch(batch, trainer.batch_sharding))
  return before, jax.device_get(after), jax.device_get(metrics)


def flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


# --- label smoothing, clipping, EMA: one step of one trainer ----------------------------------

SMOOTHING, CLIP, EMA = 0.2, 0.01, 0.9


@pytest.fixture(scope="module")
def smoothed_clipped_ema():
  config = tiny_config(label_smoothing=SMOOTHING, **{"optimizer.clip_norm": CLIP,
                                                     "optimizer.ema_decay": EMA,
                                                     "penalty.weight": 0.0})
  trainer = build(config)
  return trainer, one_step(trainer, random_batch(0))


def own_loss(model, variables, batch, smoothing):
  """Cross-entropy on smoothed targets, written out (train mode, no dropout in the config)."""
  (logits, _), _ = model.apply(variables, jnp.asarray(batch["image"]), True,
                               mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
  targets = (1 - smoothing) * jax.nn.one_hot(batch["label"], NUM_CLASSES) + smoothing / NUM_CLASSES
  return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1))


def test_label_smoothing_is_the_cross_entropy_on_smoothed_targets(smoothed_clipped_ema):
  trainer, (before, _, metrics) = smoothed_clipped_ema
  variables = {"params": before.params, "batch_stats": before.batch_stats}
  batch = random_batch(0)
  want = own_loss(trainer.model, variables, batch, SMOOTHING)
  np.testing.assert_allclose(metrics["cross_entropy"], want, rtol=1e-5)
  plain = own_loss(trainer.model, variables, batch, 0.0)
  assert abs(float(want) - float(plain)) > 30 * 1e-5 * float(want)  # well beyond the rtol


def test_clip_norm_scales_the_update_to_the_norm_and_logs_the_norm_before(smoothed_clipped_ema):
  trainer, (before, after, metrics) = smoothed_clipped_ema
  variables = {"params": before.params, "batch_stats": before.batch_stats}
  grads = jax.grad(lambda p: own_loss(trainer.model, dict(variables, params=p), random_batch(0),
                                      SMOOTHING))(before.params)
  norm = float(np.linalg.norm(flat(grads)))
  np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-4)
  assert norm > 10 * CLIP
  delta = flat(after.params) - flat(before.params)
  np.testing.assert_allclose(np.linalg.norm(delta), LR * CLIP, rtol=1e-4)  # SGD: -LR * clipped
  np.testing.assert_allclose(delta, -LR * CLIP / norm * flat(grads), atol=1e-6)


def test_the_ema_follows_params_and_batch_statistics(smoothed_clipped_ema):
  trainer, (before, after, _) = smoothed_clipped_ema
  assert before.ema is not None
  np.testing.assert_array_equal(flat(before.ema["params"]), flat(before.params))  # starts equal
  decay = min(EMA, 1 / 10)  # update 0: min(decay, (1 + t) / (10 + t))
  for part in ("params", "batch_stats"):
    want = decay * flat(before.ema[part]) + (1 - decay) * flat(getattr(after, part))
    np.testing.assert_allclose(flat(after.ema[part]), want, rtol=1e-6, atol=1e-7)
  # The EMA's sharding follows the model's (replicated here, the heads axis where split).
  shardings = jax.tree.leaves(trainer.state_shardings.ema)
  assert len(shardings) == len(jax.tree.leaves(before.ema))


def test_without_the_recipe_the_state_has_no_ema_and_the_step_is_unchanged():
  config = tiny_config()
  assert steps.Recipe.of(config) == steps.Recipe()
  assert jax.eval_shape(build(config).init_fn, jax.random.key(0)).ema is None
  old = configlib.default_config()  # a config saved before the recipe fields
  del old.label_smoothing, old.optimizer.ema_decay, old.dataset.mixup_alpha
  assert steps.Recipe.of(old) == steps.Recipe()


# --- gradient accumulation -------------------------------------------------------------------

def test_k_micro_batches_give_the_update_of_one_batch_without_batch_statistics():
  """Both heads frozen with their BatchNorm on running statistics and no dropout: every example's
  loss is independent of the others, so 4 micro-batches of 4 must give one batch of 16's update
  (the classifier trains; the penalty weight is on and its value averaged the same way)."""
  fields = {"model.frozen_heads": (0, 1), "model.frozen_bn": "running",
            "model.classifier": "pool_mlp"}
  one = build(tiny_config(**fields))
  four = build(tiny_config(**fields, **{"optimizer.accum_steps": 4}))
  batch = random_batch(1)
  start = one.init_state(jax.random.key(0))
  _, want, want_metrics = one_step(one, batch, start)
  _, got, got_metrics = one_step(four, batch, four.init_state(jax.random.key(0)))
  assert np.abs(flat(want.params) - flat(jax.device_get(start).params)).max() > 1e-3
  np.testing.assert_allclose(flat(got.params), flat(want.params), rtol=1e-5, atol=1e-6)
  for key in ("loss", "cross_entropy", "penalty", "accuracy", "grad_norm"):
    np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-5, err_msg=key)


# --- weight decay without norms and biases ---------------------------------------------------

def test_decay_norm_and_bias_false_decays_kernels_only():
  config = tiny_config(**{"optimizer.name": "adamw", "optimizer.weight_decay": 0.5})
  params = jax.device_get(build(config).init_state(jax.random.key(0)).params)
  mask = optim.decayed(params)
  named = {jax.tree_util.keystr(p): m for p, m in jax.tree.leaves_with_path(mask)}
  shapes = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree.leaves_with_path(params)}
  for name, decayed in named.items():
    per_head = "'heads'" in name
    assert decayed == (len(shapes[name]) - per_head > 1), (name, shapes[name])
  assert any(named.values()) and not all(named.values())
  assert not named["['heads']['bn1']['scale']"]  # (K, C): 1-D per head
  for decay_all in (True, False):
    config.optimizer.decay_norm_and_bias = decay_all
    tx, _ = optim.make_optimizer(config.optimizer, total_steps=10)
    zero = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)  # AdamW: only the decay term moves
    for (path, u), p in zip(jax.tree.leaves_with_path(updates), jax.tree.leaves(params)):
      name = jax.tree_util.keystr(path)
      want = -config.optimizer.learning_rate * 0.5 * p if decay_all or named[name] else 0 * p
      np.testing.assert_allclose(u, want, rtol=1e-6, atol=1e-9, err_msg=name)


# --- mixup and cutmix ------------------------------------------------------------------------

def mixed(recipe, seed=0, n=6, size=10):
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(n, size, size, 3)), jnp.float32)
  labels = jnp.asarray(rng.permutation(n) % NUM_CLASSES, jnp.int32)
  out = steps.mix_batch(jax.random.key(seed), images, labels, NUM_CLASSES, recipe)
  return np.asarray(images), np.asarray(labels), *map(np.asarray, out)


def own_targets(labels, lam, smoothing=0.0):
  one_hot = np.eye(NUM_CLASSES)[labels] * (1 - smoothing) + smoothing / NUM_CLASSES
  return lam * one_hot + (1 - lam) * one_hot[::-1]


@pytest.mark.parametrize("seed", range(4))
def test_mixup_mixes_images_and_targets_with_the_reversed_batch(seed):
  images, labels, out, targets, acc_labels = mixed(steps.Recipe(mixup_alpha=0.4), seed)
  lam = (out[0, 0, 0, 0] - images[-1, 0, 0, 0]) / (images[0, 0, 0, 0] - images[-1, 0, 0, 0])
  assert 0 <= lam <= 1
  np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(targets, own_targets(labels, lam), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(acc_labels, labels if lam >= 0.5 else labels[::-1])


@pytest.mark.parametrize("seed", range(4))
def test_cutmix_pastes_one_box_and_weighs_the_targets_by_its_area(seed):
  images, labels, out, targets, acc_labels = mixed(steps.Recipe(cutmix_alpha=1.0,
                                                                label_smoothing=0.1), seed)
  pasted = np.all(out == images[::-1], axis=(0, 3)) & ~np.all(out == images, axis=(0, 3))
  kept = np.all(out == images, axis=(0, 3))
  assert np.all(pasted | kept)  # every pixel is one image's or the other's, the same for all
  rows, cols = np.nonzero(pasted)
  if rows.size:  # one rectangle
    assert pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
  lam = 1 - pasted.mean()
  np.testing.assert_allclose(targets, own_targets(labels, lam, 0.1), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(acc_labels, labels if lam >= 0.5 else labels[::-1])
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)


def test_with_both_each_batch_is_mixed_one_way_or_the_other():
  kinds = set()
  for seed in range(12):
    images, _, out, _, _ = mixed(steps.Recipe(mixup_alpha=1.0, cutmix_alpha=1.0), seed)
    cut = np.all((out == images) | (out == images[::-1]))
    kinds.add("cutmix" if cut else "mixup")
  assert kinds == {"cutmix", "mixup"}


def test_smoothing_alone_keeps_images_and_labels():
  images, labels, out, targets, acc_labels = mixed(steps.Recipe(label_smoothing=0.3))
  np.testing.assert_array_equal(out, images)
  np.testing.assert_array_equal(acc_labels, labels)
  np.testing.assert_allclose(targets, own_targets(labels, 1.0, 0.3), rtol=1e-6)
