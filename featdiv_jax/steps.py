"""The model side of training: state, loss, train and eval steps, and the factory that jits them.

No TensorFlow, clu or ml_collections here (accelerator images lack them): configs are read by
attribute only, and steps return plain dicts of arrays that the loop turns into clu metrics.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from featdiv_jax import analysis, losses, models, sharding
from featdiv_jax.optim import make_optimizer


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  # With optimizer.ema_decay > 0: {"params", "batch_stats"}, their exponential moving average
  # (checkpointed with the rest); None otherwise, so a state without it restores as before.
  ema: Any = None


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The train step's optional regularisers and update options; the defaults change nothing.

  label_smoothing: cross-entropy on (1 - e) * one_hot + e / num_classes.
  clip_norm: > 0 scales the gradients down to this global norm (the norm is always measured:
    the `grad_norm` metric, before clipping).
  ema_decay: > 0 keeps `TrainState.ema`, updated after every step with the decay
    min(ema_decay, (1 + t) / (10 + t)) at update t (TF's ExponentialMovingAverage with
    num_updates: early on the average follows the model instead of its initialisation).
  accum_steps: k > 1 splits the batch into k micro-batches (example i goes to micro-batch
    i mod k, so every device keeps its share of each), sums their gradients in a scan and applies
    one update of their mean; BatchNorm statistics update micro-batch after micro-batch.
  mixup_alpha / cutmix_alpha: > 0 mix the whole batch (before any micro-batching) with its
    reverse, with a Beta(alpha, alpha) weight -- pixel-wise (mixup) or a box pasted in (cutmix,
    the weight then being the box's exact area share); with both, one of the two per batch, each
    with probability 1/2. The targets mix the same way; the train accuracy of a mixed batch
    counts a prediction as right when it is the label with the larger weight.
  """
  label_smoothing: float = 0.0
  clip_norm: float = 0.0
  ema_decay: float = 0.0
  accum_steps: int = 1
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0

  @classmethod
  def of(cls, config) -> "Recipe":
    """A config's recipe; fields a config saved before them lacks are off."""
    opt, data = config.optimizer, config.dataset
    return cls(label_smoothing=config.get("label_smoothing", 0.0),
               clip_norm=opt.get("clip_norm", 0.0), ema_decay=opt.get("ema_decay", 0.0),
               accum_steps=opt.get("accum_steps", 1), mixup_alpha=data.get("mixup_alpha", 0.0),
               cutmix_alpha=data.get("cutmix_alpha", 0.0))

  @property
  def soft_targets(self) -> bool:
    return bool(self.label_smoothing or self.mixup_alpha or self.cutmix_alpha)


def build_model(model_config, num_classes: int, heads_impl: str = "vmap"
                ) -> models.MultiHeadNet:
  """A MultiHeadNet from a config's `model` block."""
  m = model_config
  return models.create_multihead(
      m.arch, m.num_heads, num_classes, fusion=m.fusion, classifier=m.classifier,
      hidden=m.hidden, dropout=m.dropout, frozen_heads=m.frozen_heads, heads_impl=heads_impl,
      frozen_bn=m.frozen_bn, stem=m.stem, dtype=m.dtype, conv_impl=m.conv_impl,
      drop_path=m.drop_path)


def init_state(model, tx, rng: jax.Array, image_size: int, ema: bool = False) -> TrainState:
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = model.init(rng, x)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    batch_stats=variables["batch_stats"],
                    opt_state=tx.init(variables["params"]),
                    ema=ema_start(variables) if ema else None)


def ema_start(variables: dict) -> dict:
  """The EMA of a model that has not trained yet: its own params and BatchNorm statistics."""
  return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def ema_view(state: TrainState) -> TrainState:
  """`state` with the EMA's params and statistics in place of the model's (for evaluation)."""
  return state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"])


def normalize_images(images, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
  """uint8 pixels (the data pipeline's batches) -> float32 `(x / 255 - mean) / std` per RGB
  channel, computed on the device inside the compiled step; any other dtype is taken as model
  inputs already (synthetic benchmark batches, the tests' arrays) and passed through."""
  if images.dtype != jnp.uint8:
    return images
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _head_measures(features, kind):
  """(penalty value of `kind`, mean cosine) between heads; zeros for one head."""
  if features.shape[0] < 2:
    zero = jnp.zeros((), jnp.float32)
    return zero, zero
  return losses.cosine_diversity(features, kind), losses.cosine_diversity(features, "cos")


def train_step(state: TrainState, batch: dict, *, model, tx, penalty_weight: float,
               penalty_kind: str, seed, learning_rate_fn=None,
               skip_nonfinite: bool = False, pixels=((0.0,) * 3, (1.0,) * 3),
               recipe: Recipe = Recipe()):
  """One update. Dropout noise is `fold_in(key(seed), step)`: a resumed run repeats it exactly
  (and so the mixing of `recipe`, drawn from a key folded from the same one).

  `pixels`: the (mean, std) that uint8 batch images are normalised with (`normalize_images`).
  `recipe`: label smoothing, clipping, EMA, accumulation and mixing (`Recipe`; off by default).

  `seed` is an int or its key `jax.random.key(seed)`; passed as a key argument of the compiled
  step, runs that differ only in their seed share one compiled program.

  With `skip_nonfinite`, an update whose loss or gradients hold NaN/inf is dropped (the state
  only advances its step) and reported as `skipped` = 1.
  """
  base = seed if _is_key(seed) else jax.random.key(seed)
  rng = jax.random.fold_in(base, state.step)
  images = normalize_images(batch["image"], *pixels)
  labels = batch["label"]
  targets = None
  if recipe.soft_targets:
    num_classes = model.num_classes
    images, targets, labels = mix_batch(
        jax.random.fold_in(rng, _MIX_STREAM), images, labels, num_classes, recipe)

  def loss_fn(params, batch_stats, images, labels, targets, rng):
    (logits, features), updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, images, True, mutable=["batch_stats"],
        rngs={"dropout": rng})
    if targets is None:
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    else:
      ce = optax.softmax_cross_entropy(logits, targets).mean()
    penalty, head_cosine = _head_measures(features, penalty_kind)
    # Without a weight the penalty is still measured (for the diversity report), not trained on.
    loss = ce + penalty_weight * penalty if penalty_weight else ce
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, (updates["batch_stats"], dict(
        loss=loss, cross_entropy=ce, penalty=penalty, head_cosine=head_cosine,
        accuracy=accuracy))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if recipe.accum_steps == 1:
    (loss, (batch_stats, metrics)), grads = grad_fn(
        state.params, state.batch_stats, images, labels, targets, rng)
  else:
    grads, batch_stats, metrics = _accumulated(grad_fn, state, images, labels, targets, rng,
                                               recipe.accum_steps)
    loss = metrics["loss"]
  metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                                      for g in jax.tree.leaves(grads)))
  if recipe.clip_norm:
    scale = jnp.minimum(1.0, recipe.clip_norm / jnp.maximum(metrics["grad_norm"], 1e-12))
    grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state, ema=state.ema)
  if recipe.ema_decay:
    new_state = new_state.replace(ema=_ema_update(
        state.ema, ema_start({"params": params, "batch_stats": batch_stats}), state.step,
        recipe.ema_decay))
  # asarray: optax's constant schedule returns a Python float.
  metrics["learning_rate"] = (jnp.asarray(learning_rate_fn(state.step), jnp.float32)
                              if learning_rate_fn is not None else jnp.zeros((), jnp.float32))
  metrics["skipped"] = jnp.zeros((), jnp.float32)
  if skip_nonfinite:
    finite = jnp.isfinite(loss) & jnp.all(jnp.asarray(
        [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                             state.replace(step=state.step + 1))
    metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
  return new_state, metrics


_MIX_STREAM = 0x6D6978  # fold_in constant of the mixing's key ("mix"), apart from dropout's


def _accumulated(grad_fn, state: TrainState, images, labels, targets, rng, k: int):
  """(mean gradient, batch statistics after the last micro-batch, mean metrics) of the batch
  as k micro-batches; example i is in micro-batch i mod k (a reshape that keeps each device's
  examples on it: the batch axis is sharded in contiguous blocks)."""
  def split(x):
    return None if x is None else jnp.swapaxes(x.reshape((-1, k) + x.shape[1:]), 0, 1)

  def body(carry, micro):
    grad_sum, batch_stats = carry
    i, images, labels, targets = micro
    (_, (batch_stats, metrics)), grads = grad_fn(
        state.params, batch_stats, images, labels, targets, jax.random.fold_in(rng, i))
    return (jax.tree.map(jnp.add, grad_sum, grads), batch_stats), metrics

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (grad_sum, batch_stats), metrics = jax.lax.scan(
      body, (zeros, state.batch_stats),
      (jnp.arange(k), split(images), split(labels), split(targets)))
  return (jax.tree.map(lambda g: g / k, grad_sum), batch_stats,
          jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics))


def _ema_update(ema, model, step, decay: float):
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)
  return jax.tree.map(lambda e, m: (d * e + (1.0 - d) * m).astype(e.dtype), ema, model)


def mix_batch(rng, images, labels, num_classes: int, recipe: Recipe):
  """(images, soft targets, accuracy labels) of a batch under `recipe`'s label smoothing and
  mixup / cutmix with the batch's reverse (see `Recipe`). Pure and traced into the step."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), recipe.label_smoothing)
  if not (recipe.mixup_alpha or recipe.cutmix_alpha):
    return images, targets, labels
  choose, mix_key, cut_key, box_key = jax.random.split(rng, 4)
  partner = images[::-1]
  mixed, weights = [], []
  if recipe.mixup_alpha:
    lam = jax.random.beta(mix_key, recipe.mixup_alpha, recipe.mixup_alpha)
    mixed.append(lam * images + (1.0 - lam) * partner)
    weights.append(lam)
  if recipe.cutmix_alpha:
    lam = jax.random.beta(cut_key, recipe.cutmix_alpha, recipe.cutmix_alpha)
    inside, area = cutmix_box(box_key, images.shape[1], images.shape[2], lam)
    mixed.append(jnp.where(inside[None, :, :, None], partner, images))
    weights.append(1.0 - area)
  if len(mixed) == 2:  # both: one of them for this batch, with probability 1/2 each
    use_cutmix = jax.random.bernoulli(choose)
    images = jnp.where(use_cutmix, mixed[1], mixed[0])
    lam = jnp.where(use_cutmix, weights[1], weights[0])
  else:
    images, lam = mixed[0], weights[0]
  targets = lam * targets + (1.0 - lam) * targets[::-1]
  return images, targets, jnp.where(lam >= 0.5, labels, labels[::-1])


def cutmix_box(rng, height: int, width: int, lam):
  """((H, W) bool mask of the box pasted from the partner image, its share of the area): a box
  of sides sqrt(1 - lam) * (H, W) centred uniformly at random, clipped to the image (timm's
  `rand_bbox`; the weight of the image's own label is then 1 - that share)."""
  cy_key, cx_key = jax.random.split(rng)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (ratio * height).astype(jnp.int32), (ratio * width).astype(jnp.int32)
  cy = jax.random.randint(cy_key, (), 0, height)
  cx = jax.random.randint(cx_key, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  ys, xs = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
  return inside, ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


# eval_step outputs that are per example (batch axis last but one for `pooled`), not sums.
PER_EXAMPLE = ("pooled", "label", "mask")


def eval_step(state: TrainState, batch: dict, *, model, pixels=((0.0,) * 3, (1.0,) * 3)):
  """Masked sums over one eval batch (padding examples have mask False), and its examples.
  uint8 images are normalised with `pixels` = (mean, std) first.

  Sums: loss_sum, correct, count; cosine_sum, the (K, K) per-example mean cosine between heads
  summed over real examples; ablation_correct, (K,) correct predictions with head k's map
  replaced by its mean over the batch's real examples. The loop adds these up and divides once
  at the end. Per example (`PER_EXAMPLE`): `pooled`, the heads' pooled features (K, B, C) in
  float32, `label` and `mask`; zero (label -1) where mask is False, so padding never depends on
  what fills it. The analysis of the heads (CKA, linear probes) reads these.
  """
  logits, features, ablated = model.apply(
      {"params": state.params, "batch_stats": state.batch_stats},
      normalize_images(batch["image"], *pixels), False, ablation_mask=batch["mask"])
  mask = batch["mask"].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  ablated_correct = (jnp.argmax(ablated, -1) == batch["label"]).astype(jnp.float32)  # (K, B)
  cos = losses.pairwise_cosines(features)          # (K, K, B, H, W)
  per_example = jnp.mean(cos.reshape(cos.shape[:3] + (-1,)), axis=-1)
  return dict(loss_sum=jnp.sum(ce * mask), correct=jnp.sum(correct * mask),
              count=jnp.sum(mask), cosine_sum=jnp.einsum("klb,b->kl", per_example, mask),
              ablation_correct=ablated_correct @ mask,
              pooled=analysis.pooled(features) * mask[None, :, None],
              label=jnp.where(batch["mask"], batch["label"], -1), mask=batch["mask"])


@dataclasses.dataclass(frozen=True)
class SeededStep:
  """A jitted `(state, batch, seed_key)` step called as `(state, batch)` with the run's key.

  The seed is an argument of the compiled program, not a constant in it, so runs that differ
  only in their seed compile once (and share the persistent compilation cache).
  """
  jitted: Callable
  seed_key: jax.Array

  def __call__(self, state, batch, *rest):
    return self.jitted(state, batch, self.seed_key, *rest)

  def lower(self, state, batch, *rest):
    return self.jitted.lower(state, batch, self.seed_key, *rest)

  def compile(self, state, batch, *rest) -> "SeededStep":
    """The step compiled ahead of time for these input shapes, called the same way."""
    return SeededStep(self.lower(state, batch, *rest).compile(), self.seed_key)


@dataclasses.dataclass(frozen=True)
class Trainer:
  """One config's model, optimizer and compiled steps on one mesh, built by `make_trainer`.

  `train_step(state, batch)` returns `(state, metrics)` -- plus `metrics_fn(metrics)` when one
  was given -- and donates the old state; `eval_step(state, batch)` returns `eval_step`'s sums
  and per-example outputs. With an `accumulate_fn`, `loop_step(state, batch, carry)` returns
  `(state, accumulate_fn(carry, metrics, step))` and donates both: the training loop's step,
  whose metrics never leave the device; `make_carry(*args)` is `carry_fn(*args)` compiled onto
  the mesh (replicated).
  All take and return arrays laid out by `state_shardings` / `batch_sharding`.
  """
  model: models.MultiHeadNet
  tx: optax.GradientTransformation
  learning_rate_fn: optax.Schedule
  init_fn: Callable[[jax.Array], TrainState]  # rng -> state, not compiled
  abstract_state: Any                           # ShapeDtypeStructs of the state
  state_shardings: Any
  batch_sharding: NamedSharding
  train_step: SeededStep
  eval_step: Callable
  loop_step: Optional[SeededStep] = None
  make_carry: Optional[Callable] = None

  def init_state(self, rng: jax.Array) -> TrainState:
    """A fresh state, created directly in its shardings."""
    return jax.jit(self.init_fn, out_shardings=self.state_shardings)(rng)


def make_trainer(config, num_classes: int, mesh: jax.sharding.Mesh, *, total_steps: int,
                 steps_per_epoch: int = 0, heads_impl: str = "vmap",
                 metrics_fn: Optional[Callable] = None,
                 accumulate_fn: Optional[Callable] = None,
                 carry_fn: Optional[Callable] = None) -> Trainer:
  """The one place where a config becomes a model, an optimizer and jitted train/eval steps.

  `total_steps` (and `steps_per_epoch`, for schedules in epochs) set the learning-rate
  schedule. `metrics_fn`, a pure function of one
  step's metrics dict, is traced into the compiled train step (the loop uses it to build its clu
  metrics without leaving the step). `accumulate_fn(carry, metrics, step)` and `carry_fn` (the
  carry's constructor), pure functions, make `loop_step` and `make_carry`. `heads_impl="loop"`
  builds K separate head modules instead of the vmapped stack (the benchmark's comparison).
  uint8 batch images are normalised in the steps with `config.dataset.mean` / `std`.
  """
  model = build_model(config.model, num_classes, heads_impl)
  tx, lr_fn = make_optimizer(config.optimizer, total_steps, config.model.frozen_heads,
                             steps_per_epoch)
  recipe = Recipe.of(config)
  init_fn = functools.partial(init_state, model, tx, image_size=config.dataset.image_size,
                              ema=bool(recipe.ema_decay))
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  state_sh = sharding.state_shardings(mesh, abstract, config.model.num_heads)
  batch_sh = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  pixels = (tuple(config.dataset.mean), tuple(config.dataset.std))
  step_fn = functools.partial(
      train_step, model=model, tx=tx, penalty_weight=config.penalty.weight,
      penalty_kind=config.penalty.kind, learning_rate_fn=lr_fn,
      skip_nonfinite=config.skip_nonfinite, pixels=pixels, recipe=recipe)

  def train_and_summarise(state, batch, seed_key):
    state, metrics = step_fn(state, batch, seed=seed_key)
    return (state, metrics) if metrics_fn is None else (state, metrics, metrics_fn(metrics))

  def train_and_accumulate(state, batch, seed_key, carry):
    state, metrics = step_fn(state, batch, seed=seed_key)
    return state, accumulate_fn(carry, metrics, state.step)

  outputs = (state_sh, replicated) + ((replicated,) if metrics_fn is not None else ())
  compiled = jax.jit(train_and_summarise, in_shardings=(state_sh, batch_sh, replicated),
                     out_shardings=outputs, donate_argnums=0)
  # Made by a compiled function: device_put cannot place a value on other processes' devices.
  seed_key = jax.jit(lambda: jax.random.key(config.seed), out_shardings=replicated)()
  loop_step = make_carry = None
  if accumulate_fn is not None:
    loop_step = SeededStep(jax.jit(
        train_and_accumulate, in_shardings=(state_sh, batch_sh, replicated, replicated),
        out_shardings=(state_sh, replicated), donate_argnums=(0, 3)), seed_key)
    make_carry = jax.jit(carry_fn, out_shardings=replicated)
  return Trainer(
      model=model, tx=tx, learning_rate_fn=lr_fn, init_fn=init_fn, abstract_state=abstract,
      state_shardings=state_sh, batch_sharding=batch_sh,
      train_step=SeededStep(compiled, seed_key),
      eval_step=jax.jit(functools.partial(eval_step, model=model, pixels=pixels),
                        in_shardings=(state_sh, batch_sh), out_shardings=replicated),
      loop_step=loop_step, make_carry=make_carry)
