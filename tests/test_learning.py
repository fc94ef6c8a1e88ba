"""The training mathematics, each checked against an independent computation.

Every expected value here comes from outside the code under test: the model applied by hand with
the train step's own parameters, batch and dropout key; cross-entropy and the penalty computed
from its outputs; AdamW / SGD written out in numpy from gradients of our own loss; BatchNorm
statistics from the layers' inputs; the learning-rate schedule from its formula. Nothing is
compared with another run of the same code.

Compiling is what costs here (about 10-20 s per train step on a 2-core machine), so the file
builds four train steps, one per objective / optimizer, once per module, and shares them:

  multi      K=2, penalty weight 0,           AdamW, 1 device
  cos        K=2, cos penalty weight 2.5,     AdamW, 8 devices (the default (-1, 1) mesh)
  align      K=2, align penalty weight 2.5,   SGD + momentum + 2 warm-up steps, 1 device
  frozen     as `cos` with head 0 frozen,     AdamW, 1 device
"""

import functools
import math
import re

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from featdiv_jax import configlib, losses, optim, sharding, steps

NUM_CLASSES = 4
SIZE = 8            # 8 px images with the CIFAR stem: maps 8, 8, 4, 2, 1
BATCH = 24          # 3 per device on 8 devices; 24 is no channel width, so it is findable in HLO
TOTAL_STEPS = 40
WEIGHT = 2.5
ADAM_LR, SGD_LR, WEIGHT_DECAY, MOMENTUM, SGD_WARMUP = 3e-3, 0.05, 0.5, 0.9, 2
SEED = 3            # the train step's dropout key is fold_in(key(SEED), step)
BN_MOMENTUM = 0.1   # torch's: running = (1 - 0.1) * running + 0.1 * batch statistic


def tiny_config(variant, kind="cos", optimizer="adamw", frozen_heads=()):
  c = configlib.apply_arg(configlib.default_config(),
                          f"{variant},heads=2,weight={WEIGHT},kind={kind},smoke")
  c.seed = SEED
  c.model.stem = "cifar"
  c.model.hidden = 16
  c.model.dropout = 0.3
  c.model.frozen_heads = tuple(frozen_heads)
  c.dataset.image_size = SIZE
  c.optimizer.name = optimizer
  c.optimizer.weight_decay = WEIGHT_DECAY  # large, so a missing decay term is visible
  c.optimizer.momentum = MOMENTUM
  c.optimizer.schedule = "cosine"
  if optimizer == "sgd":
    c.optimizer.learning_rate, c.optimizer.warmup_steps = SGD_LR, SGD_WARMUP
  else:
    c.optimizer.learning_rate, c.optimizer.warmup_steps = ADAM_LR, 0
  return c


def build(config, devices):
  mesh = sharding.make_mesh((-1, 1), devices=devices)
  return config, steps.make_trainer(config, NUM_CLASSES, mesh, total_steps=TOTAL_STEPS)


@pytest.fixture(scope="module")
def multi():
  return build(tiny_config("multi"), jax.devices()[:1])


@pytest.fixture(scope="module")
def cos():
  assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
  return build(tiny_config("multi_cos"), jax.devices())


@pytest.fixture(scope="module")
def align():
  return build(tiny_config("multi_cos", kind="align", optimizer="sgd"), jax.devices()[:1])


@pytest.fixture(scope="module")
def frozen():
  return build(tiny_config("multi_cos", frozen_heads=(0,)), jax.devices()[:1])


TRAINERS = {"multi": (0.0, "cos"), "cos": (WEIGHT, "cos"), "align": (WEIGHT, "align")}


# --- data ------------------------------------------------------------------------------------

def random_batch(seed, n=BATCH):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, SIZE, SIZE, 3)).astype(np.float32),
          "label": rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)}


TEMPLATES = np.random.default_rng(1234).normal(size=(NUM_CLASSES, SIZE, SIZE, 3))


def separable_batch(seed, n=BATCH):
  """One fixed random template per class plus unit noise: linearly separable by far."""
  rng = np.random.default_rng(seed)
  label = rng.integers(0, NUM_CLASSES, size=n)
  image = TEMPLATES[label] + rng.normal(size=(n, SIZE, SIZE, 3))
  return {"image": image.astype(np.float32), "label": label.astype(np.int32)}


# --- our own computations --------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def own_fns(model):
  """Jitted forward passes of `model`, written here, not taken from featdiv_jax.steps."""

  @jax.jit
  def train_forward(params, batch_stats, image, label, rng, w_cos, w_align):
    def loss_fn(p):
      (logits, features), upd = model.apply(
          {"params": p, "batch_stats": batch_stats}, image, True,
          mutable=["batch_stats", "intermediates"], rngs={"dropout": rng},
          capture_intermediates=True)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()
      pen_cos = losses.cosine_diversity(features, "cos")
      pen_align = losses.cosine_diversity(features, "align")
      loss = ce + w_cos * pen_cos + w_align * pen_align
      return loss, dict(logits=logits, features=features, inter=upd["intermediates"])
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, aux, grads

  @jax.jit
  def eval_forward(params, batch_stats, image, rng):
    (logits, features), upd = model.apply(
        {"params": params, "batch_stats": batch_stats}, image, False,
        rngs={"dropout": rng}, mutable=["intermediates"], capture_intermediates=True)
    return logits, features, upd["intermediates"]

  return train_forward, eval_forward


def own_train(model, state, batch, step, weight=0.0, kind="cos"):
  """(loss, aux, grads) of ce + weight * penalty(kind), with the train step's dropout key."""
  rng = jax.random.fold_in(jax.random.key(SEED), step)
  w_cos, w_align = (weight, 0.0) if kind == "cos" else (0.0, weight)
  out = own_fns(model)[0](state.params, state.batch_stats, batch["image"], batch["label"],
                          rng, np.float32(w_cos), np.float32(w_align))
  return jax.device_get(out)


def numpy_head_cosine(features):
  """Mean over head pairs, examples and positions of the cosine between channel vectors."""
  f = np.asarray(features, np.float64)
  u = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-8)
  k = f.shape[0]
  return np.mean([np.mean(np.sum(u[i] * u[j], -1)) for i in range(k) for j in range(i + 1, k)])


def lr_formula(step, peak, warmup, total=TOTAL_STEPS):
  if step < warmup:
    return peak * step / warmup
  return peak * 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup)
                                    / (total - warmup)))


def leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(tree)}


# --- states ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def init_vars(cos):
  """Numpy params and batch_stats of a freshly initialised model (shared by every trainer)."""
  state = jax.device_get(cos[1].init_state(jax.random.key(0)))
  return state.params, state.batch_stats


def fresh_state(trainer, init_vars, batch_stats=None):
  params, stats = init_vars
  stats = stats if batch_stats is None else batch_stats
  state = steps.TrainState(step=np.zeros((), np.int32), params=params, batch_stats=stats,
                           opt_state=trainer.tx.init(params))
  return jax.device_put(state, trainer.state_shardings)


def step(trainer, state, batch):
  """One train step; returns (numpy state before it, new state, numpy metrics)."""
  before = jax.device_get(state)  # train_step donates `state`
  state, metrics = trainer.train_step(state, sharding.global_batch(batch, trainer.batch_sharding))
  return before, state, jax.device_get(metrics)


def eval_sums(trainer, state, batch, mask):
  return jax.device_get(trainer.eval_step(state, sharding.global_batch(
      dict(batch, mask=mask), trainer.batch_sharding)))


# --- 1. the loss and the penalty's gradient --------------------------------------------------

@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_train_step_loss_is_cross_entropy_plus_weight_times_penalty(name, request, init_vars):
  config, trainer = request.getfixturevalue(name)
  weight, kind = TRAINERS[name]
  batch = random_batch(10)
  before, _, metrics = step(trainer, fresh_state(trainer, init_vars), batch)
  _, aux, _ = own_train(trainer.model, before, batch, step=0)

  # our own cross-entropy and penalty, from the model's outputs under the step's dropout key
  ce = optax.softmax_cross_entropy_with_integer_labels(aux["logits"], batch["label"]).mean()
  features = aux["features"]
  assert features.shape == (2, BATCH, 1, 1, 64)
  penalty = losses.cosine_diversity(features, kind)
  cosine = numpy_head_cosine(features)
  np.testing.assert_allclose(losses.cosine_diversity(features, "cos"), cosine, rtol=1e-5)
  assert 0.05 < cosine < 0.95  # a penalty term that matters, whichever its sign
  np.testing.assert_allclose(penalty, cosine if kind == "cos" else 1 - cosine, rtol=1e-5)

  np.testing.assert_allclose(metrics["cross_entropy"], ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["penalty"], penalty, rtol=1e-5)
  np.testing.assert_allclose(metrics["head_cosine"], cosine, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], ce + weight * penalty, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"],
                             np.mean(np.argmax(aux["logits"], -1) == batch["label"]))
  if weight:  # the weighted term is a visible part of the loss
    assert abs(metrics["loss"] - ce) > 0.1


def test_penalty_gradient_lowers_head_cosine_for_cos_and_raises_it_for_align(
    multi, cos, align, init_vars):
  """Five steps on one batch from one start: the cos penalty leaves the heads less alike than
  they started and than no penalty does; align leaves them more alike than they started (the
  align trainer uses SGD, so it is compared with the start only). Cosines measured here."""
  batch = random_batch(11)
  start = numpy_head_cosine(own_train(multi[1].model, steps.TrainState(
      0, *init_vars, None), batch, 0)[1]["features"])
  end = {}
  for name, (config, trainer) in {"multi": multi, "cos": cos, "align": align}.items():
    state = fresh_state(trainer, init_vars)
    for _ in range(5):
      _, state, _ = step(trainer, state, batch)
    state = jax.device_get(state)
    end[name] = numpy_head_cosine(own_train(trainer.model, state, batch, 5)[1]["features"])
  assert end["cos"] < start - 0.05, (start, end)
  assert end["cos"] < end["multi"] - 0.05, (start, end)
  assert end["align"] > start + 0.05, (start, end)


# --- 2. a tiny model learns ------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(multi, cos, init_vars):
  """`multi` and `cos` trained from the same start on the same separable batches."""
  out = {}
  for name, (config, trainer) in {"multi": multi, "cos": cos}.items():
    state, history = fresh_state(trainer, init_vars), []
    for i in range(TOTAL_STEPS):
      _, state, metrics = step(trainer, state, separable_batch(100 + i))
      history.append(metrics)
    out[name] = (state, history)
  return out


def test_tiny_model_learns_a_separable_set_and_the_penalty_lowers_head_cosine(trained, cos):
  for name, (state, history) in trained.items():
    assert np.isfinite([h["loss"] for h in history]).all()
    assert np.mean([h["accuracy"] for h in history[-5:]]) > 0.7, name  # chance: 0.25
    assert np.mean([h["loss"] for h in history[-5:]]) < history[0]["loss"] - 0.5, name
  # held-out accuracy through the eval step (running BatchNorm statistics, no dropout)
  trainer = cos[1]
  correct = sum(eval_sums(trainer, trained["cos"][0], separable_batch(900 + i),
                          np.ones(BATCH, bool))["correct"] for i in range(3))
  assert correct / (3 * BATCH) > 0.7
  held_out = separable_batch(999)
  # head cosine on held-out data, measured here in evaluation mode
  cosines = {}
  for name, (state, _) in trained.items():
    state = jax.device_get(state)
    _, features, _ = own_fns(trainer.model)[1](state.params, state.batch_stats,
                                               held_out["image"], jax.random.key(0))
    cosines[name] = numpy_head_cosine(features)
  assert cosines["cos"] < cosines["multi"] - 0.05, cosines


# --- 3. the optimizer ------------------------------------------------------------------------

def test_learning_rate_schedule_is_linear_warmup_then_cosine_to_zero(cos, align):
  for (config, trainer), peak, warmup in [(cos, ADAM_LR, 0), (align, SGD_LR, SGD_WARMUP)]:
    for t in range(TOTAL_STEPS + 1):
      expected = lr_formula(t, peak, warmup)
      np.testing.assert_allclose(trainer.learning_rate_fn(t), expected, rtol=1e-6, atol=1e-9,
                                 err_msg=f"{config.optimizer.name} step {t}")
  assert float(cos[1].learning_rate_fn(0)) == pytest.approx(ADAM_LR)
  assert float(align[1].learning_rate_fn(0)) == 0.0
  assert float(align[1].learning_rate_fn(1)) == pytest.approx(SGD_LR / SGD_WARMUP)
  assert float(cos[1].learning_rate_fn(TOTAL_STEPS)) == pytest.approx(0.0, abs=1e-9)
  constant = tiny_config("multi_cos")
  constant.optimizer.schedule, constant.optimizer.warmup_steps = "constant", 4
  sched = optim.learning_rate_schedule(constant.optimizer, TOTAL_STEPS)
  np.testing.assert_allclose([sched(t) for t in (0, 2, 4, 20, 40)],
                             [0, ADAM_LR / 2, ADAM_LR, ADAM_LR, ADAM_LR], rtol=1e-6)


def test_adamw_step_is_torch_adamw_with_decoupled_decay(cos, init_vars):
  """Two steps against AdamW in numpy (b1 0.9, b2 0.999, eps 1e-8; decay lr * wd * p)."""
  config, trainer = cos
  b1, b2, eps = 0.9, 0.999, 1e-8
  state = fresh_state(trainer, init_vars)
  m = v = None
  for t in range(2):
    batch = random_batch(20 + t)
    before, state, metrics = step(trainer, state, batch)
    lr = lr_formula(t, ADAM_LR, 0)
    np.testing.assert_allclose(metrics["learning_rate"], lr, rtol=1e-6)
    _, _, grads = own_train(trainer.model, before, batch, t, WEIGHT, "cos")
    g, p0, p1 = leaves(grads), leaves(before.params), leaves(jax.device_get(state.params))
    if m is None:
      m = {k: np.zeros_like(x, np.float64) for k, x in g.items()}
      v = {k: np.zeros_like(x, np.float64) for k, x in g.items()}
    bad, zero_grad = {}, 0
    for k in g:
      gk = g[k].astype(np.float64)
      m[k] = b1 * m[k] + (1 - b1) * gk
      v[k] = b2 * v[k] + (1 - b2) * gk ** 2
      m_hat, v_hat = m[k] / (1 - b1 ** (t + 1)), v[k] / (1 - b2 ** (t + 1))
      expected = p0[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + WEIGHT_DECAY * p0[k])
      # The update is about lr * (sign(g) + wd * p). A relative rounding difference r in g
      # (another summation order, 8 devices) moves g / (|g| + eps) by at most r / 4, far below
      # 5e-3; a missing or misplaced decay term moves it by about lr * wd * |p|.
      err = np.abs(p1[k] - expected).max()
      if err > 5e-3 * lr:
        bad[k] = err / lr
      # where the gradient is exactly zero only the decoupled decay moves a parameter
      exact_zero = v[k] == 0
      zero_grad += int(exact_zero.sum())
      np.testing.assert_allclose(p1[k][exact_zero], (p0[k] * (1 - lr * WEIGHT_DECAY))[exact_zero],
                                 rtol=1e-6, err_msg=k)
    assert not bad, f"step {t}: params off the hand-computed AdamW update by (x lr): {bad}"
    # zero-initialised last BatchNorms cut their blocks' gradients at first; kernel taps that
    # only read padding (3x3 on the 1x1 maps of layer4) never get any
    assert zero_grad > 1000
  assert int(state.step) == 2


def test_sgd_step_is_torch_sgd_with_momentum_and_decay_before_momentum(align, init_vars):
  """Three steps (lr 0, lr/2, lr: the warm-up) against torch's SGD in numpy:
  d = g + wd * p; buf = momentum * buf + d (buf = d at first); p -= lr * buf."""
  config, trainer = align
  state = fresh_state(trainer, init_vars)
  buf = None
  for t in range(3):
    batch = random_batch(30 + t)
    before, state, metrics = step(trainer, state, batch)
    lr = lr_formula(t, SGD_LR, SGD_WARMUP)
    np.testing.assert_allclose(metrics["learning_rate"], lr, rtol=1e-6, atol=1e-9)
    _, _, grads = own_train(trainer.model, before, batch, t, WEIGHT, "align")
    g, p0, p1 = leaves(grads), leaves(before.params), leaves(jax.device_get(state.params))
    d = {k: g[k].astype(np.float64) + WEIGHT_DECAY * p0[k] for k in g}
    buf = d if buf is None else {k: MOMENTUM * buf[k] + d[k] for k in g}
    for k in g:
      expected = p0[k] - lr * buf[k]
      np.testing.assert_allclose(p1[k], expected, rtol=1e-5, atol=1e-7, err_msg=f"step {t} {k}")
    if t == 0:  # warm-up starts at lr 0: the first step leaves the parameters where they were
      for k in g:
        np.testing.assert_array_equal(p1[k], p0[k], err_msg=k)
    else:
      assert sum(np.abs(p1[k] - p0[k]).sum() for k in g) > 1.0


# --- 4. BatchNorm and evaluation -------------------------------------------------------------

def numpy_stem_conv(image, kernel):
  """3x3, stride 1, padding 1 convolution of (B, H, W, 3) with per-head (K, 3, 3, 3, C)."""
  x = np.pad(np.asarray(image, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = image.shape[1:3]
  return sum(np.einsum("bhwc,kco->kbhwo", x[:, i:i + h, j:j + w], kernel[:, i, j])
             for i in range(3) for j in range(3))


def bn_inputs(inter, stats_paths):
  """The captured output of the conv that feeds each BatchNorm (bn1<-conv1, downsample)."""
  out = {}
  for path in stats_paths:
    *parents, bn = path
    conv = "downsample_conv" if bn == "downsample_bn" else bn.replace("bn", "conv")
    node = inter
    for p in (*parents, conv):
      node = node[p]
    out[path] = np.asarray(node["__call__"][0], np.float64)
  return out


def test_batchnorm_running_statistics_follow_torch_momentum_over_the_global_batch(
    cos, init_vars):
  """Every BatchNorm layer, two train steps on 8 devices: running = 0.9 * running + 0.1 *
  statistic of the whole batch (the mean; the unbiased variance, as torch keeps)."""
  config, trainer = cos
  state = fresh_state(trainer, init_vars)
  for t in range(2):
    batch = random_batch(40 + t)
    before, state, _ = step(trainer, state, batch)
    _, aux, _ = own_train(trainer.model, before, batch, t)
    if t == 0:  # the captured stem conv output is this convolution of the batch
      np.testing.assert_allclose(
          aux["inter"]["heads"]["conv1"]["__call__"][0],
          numpy_stem_conv(batch["image"], before.params["heads"]["conv1"]["kernel"]),
          rtol=1e-4, atol=1e-5)
    new = jax.device_get(state.batch_stats)["heads"]
    old = before.batch_stats["heads"]
    paths = [tuple(k.key for k in p[:-1]) for p, _ in jax.tree.leaves_with_path(old)
             if p[-1].key == "mean"]
    assert len(paths) == 12  # stem + 2 in each of 4 blocks + 3 downsamples
    inputs = bn_inputs(aux["inter"]["heads"], paths)
    sizes = set()
    for path in paths:
      x = inputs[path]                                   # (K, B, H, W, C)
      n = int(np.prod(x.shape[1:4]))
      sizes.add(n)
      mean = x.mean(axis=(1, 2, 3))
      var = x.var(axis=(1, 2, 3), ddof=1)
      o = functools.reduce(lambda d, key: d[key], path, old)
      e = functools.reduce(lambda d, key: d[key], path, new)
      np.testing.assert_allclose(e["mean"], (1 - BN_MOMENTUM) * o["mean"] + BN_MOMENTUM * mean,
                                 rtol=1e-4, atol=1e-6, err_msg=f"step {t} {path} mean")
      np.testing.assert_allclose(e["var"], (1 - BN_MOMENTUM) * o["var"] + BN_MOMENTUM * var,
                                 rtol=1e-5, atol=1e-7, err_msg=f"step {t} {path} var")
    assert BATCH in sizes  # the 1x1 maps: unbiased (n / (n-1) = 24/23) is far from biased


def test_evaluation_uses_running_statistics(trained, cos):
  """After training, an example's eval result does not depend on the rest of its batch, the
  first BatchNorm normalises with its running statistics, and the eval step's sums are the
  cross-entropy and accuracy of the model applied here in evaluation mode."""
  _, trainer = cos
  state = trained["cos"][0]
  host = jax.device_get(state)
  batch = separable_batch(500)
  first_half = np.arange(BATCH) < BATCH // 2
  other = separable_batch(501)
  mixed = {"image": np.where(first_half[:, None, None, None], batch["image"],
                             other["image"] * 3 + 1),
           "label": np.where(first_half, batch["label"], other["label"])}
  a = eval_sums(trainer, state, batch, first_half)
  b = eval_sums(trainer, state, mixed, first_half)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)

  logits, features, inter = own_fns(trainer.model)[1](host.params, host.batch_stats,
                                                      batch["image"], jax.random.key(0))
  full = eval_sums(trainer, state, batch, np.ones(BATCH, bool))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  np.testing.assert_allclose(full["loss_sum"], np.sum(ce), rtol=1e-5)
  assert full["correct"] == np.sum(np.argmax(logits, -1) == batch["label"])

  # the stem BatchNorm in evaluation: (x - running mean) / sqrt(running var + 1e-5)
  x = np.asarray(inter["heads"]["conv1"]["__call__"][0], np.float64)
  y = np.asarray(inter["heads"]["bn1"]["__call__"][0], np.float64)
  stats, params = host.batch_stats["heads"]["bn1"], host.params["heads"]["bn1"]
  shape = (2, 1, 1, 1, -1)  # per head and channel
  scale, bias = params["scale"].reshape(shape), params["bias"].reshape(shape)
  running = (x - stats["mean"].reshape(shape)) / np.sqrt(stats["var"].reshape(shape) + 1e-5)
  np.testing.assert_allclose(y, running * scale + bias, rtol=1e-4, atol=1e-5)
  # ... which after training are far from this batch's own statistics
  batchwise = (x - x.mean((1, 2, 3), keepdims=True)) / np.sqrt(
      x.var((1, 2, 3), keepdims=True) + 1e-5)
  assert np.abs((batchwise - running) * scale).max() > 1e-2


def test_dropout_is_off_in_evaluation_and_on_in_training(trained, cos):
  _, trainer = cos
  state = trained["cos"][0]
  host = jax.device_get(state)
  batch = separable_batch(600)
  train_forward, eval_forward = own_fns(trainer.model)
  eval_a = eval_forward(host.params, host.batch_stats, batch["image"], jax.random.key(1))[0]
  eval_b = eval_forward(host.params, host.batch_stats, batch["image"], jax.random.key(2))[0]
  np.testing.assert_array_equal(eval_a, eval_b)
  mask = np.ones(BATCH, bool)
  first, second = eval_sums(trainer, state, batch, mask), eval_sums(trainer, state, batch, mask)
  for k in first:
    np.testing.assert_array_equal(first[k], second[k], err_msg=k)
  # training: the same parameters, batch statistics and batch, two dropout keys
  out = [train_forward(host.params, host.batch_stats, batch["image"], batch["label"],
                       jax.random.key(s), np.float32(0), np.float32(0))[1] for s in (1, 2)]
  np.testing.assert_array_equal(out[0]["features"], out[1]["features"])  # dropout: classifier only
  diff = np.abs(np.asarray(out[0]["logits"]) - np.asarray(out[1]["logits"]))
  assert diff.max() > 1e-3


# --- 5. frozen heads -------------------------------------------------------------------------

def test_frozen_head_keeps_params_and_batch_stats_bit_identical(frozen, init_vars):
  config, trainer = frozen
  assert config.model.frozen_heads == (0,)
  params, stats = init_vars
  # a pretrained head has non-trivial running statistics; head 1's are torch's initial ones
  stats = jax.tree.map(lambda a: np.concatenate([a[:1] * 1.5 + 0.2, a[1:]]), stats)
  state = fresh_state(trainer, init_vars, stats)
  for t in range(3):
    _, state, metrics = step(trainer, state, random_batch(50 + t))
    assert np.isfinite(metrics["loss"])
  end = jax.device_get(state)
  for col, start in (("params", params), ("batch_stats", stats)):
    old, new = leaves(start["heads"]), leaves(getattr(end, col)["heads"])
    for k in old:
      np.testing.assert_array_equal(new[k][0], old[k][0], err_msg=f"frozen head 0 {col}{k}")
      assert not np.array_equal(new[k][1], old[k][1]), f"head 1 {col}{k} did not change"
  old = leaves({n: v for n, v in params.items() if n != "heads"})
  new = leaves({n: v for n, v in end.params.items() if n != "heads"})
  assert set(old) == set(new) and len(old) == 4  # hidden and fc: kernel and bias
  for k in old:
    assert not np.array_equal(new[k], old[k]), f"classifier {k} did not change"


# --- 6. the batch is split over the data axis ------------------------------------------------

def test_batch_and_activations_are_split_over_the_data_axis(cos, init_vars):
  config, trainer = cos
  assert trainer.batch_sharding.spec == P("data")
  batch = sharding.global_batch(random_batch(60), trainer.batch_sharding)
  per_device = BATCH // 8
  for key, shape in (("image", (per_device, SIZE, SIZE, 3)), ("label", (per_device,))):
    shards = batch[key].addressable_shards
    assert len({s.device for s in shards}) == 8
    assert all(s.data.shape == shape for s in shards), [s.data.shape for s in shards]
    starts = sorted(s.index[0].start for s in shards)
    assert starts == list(range(0, BATCH, per_device))  # disjoint slices covering the batch
  state = fresh_state(trainer, init_vars)
  hlo = trainer.train_step.lower(state, batch).compile().as_text()
  # the per-device program: the image parameter and every (K, B, 8, 8, 8) activation of the
  # stem and first stage hold B/8 examples; im2col's patch matmuls have B/8 * 64 rows
  image_params = re.findall(r"(f32\[[\d,]+\])\{[\d,]+\} parameter\(\d+\).*batch\[\\?'image", hlo)
  assert image_params == [f"f32[{per_device},{SIZE},{SIZE},3]"], image_params
  maps = set(re.findall(r"f32\[2,(\d+),8,8,8\]", hlo))
  assert maps == {str(per_device)}, maps
  if trainer.model.backbone["conv_impl"] == "im2col":  # the CPU default: convs are matmuls
    rows = set(re.findall(r"f32\[2,(\d+),72\]", hlo))
    assert str(per_device * SIZE * SIZE) in rows and str(BATCH * SIZE * SIZE) not in rows, rows
  assert "all-gather" not in hlo  # nothing gathers the batch back onto one device
