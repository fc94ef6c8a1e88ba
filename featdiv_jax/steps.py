"""The model side of training as pure functions: state, optimizer, loss, train and eval steps.

No TensorFlow, clu or ml_collections here (accelerator images lack them): configs are read by
attribute only, and steps return plain dicts of arrays that the loop turns into clu metrics.
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from featdiv_jax import losses, models
from featdiv_jax.optim import freeze_heads


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def build_model(mc, num_classes: int) -> models.MultiHeadNet:
  """A MultiHeadNet from a config's `model` block."""
  return models.create_multihead(
      mc.arch, int(mc.num_heads), num_classes, fusion=mc.fusion, classifier=mc.classifier,
      hidden=int(mc.hidden), dropout=float(mc.dropout), frozen_heads=tuple(mc.frozen_heads),
      stem=mc.stem, dtype=mc.dtype, conv_impl=mc.conv_impl)


def learning_rate_schedule(oc, total_steps: int) -> optax.Schedule:
  peak, warmup = float(oc.learning_rate), int(oc.warmup_steps)
  if oc.schedule == "constant":
    main = optax.constant_schedule(peak)
  elif oc.schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1))
  else:
    raise ValueError(f"optimizer.schedule={oc.schedule!r}; valid: cosine, constant")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def make_optimizer(oc, total_steps: int, frozen_heads=()) -> optax.GradientTransformation:
  """AdamW or SGD with weight decay on every parameter (torch's behaviour), frozen heads last."""
  lr = learning_rate_schedule(oc, total_steps)
  if oc.name == "adamw":
    tx = optax.adamw(lr, weight_decay=float(oc.weight_decay))
  elif oc.name == "sgd":  # torch SGD adds the decay to the gradient, before momentum
    tx = optax.chain(optax.add_decayed_weights(float(oc.weight_decay)),
                     optax.sgd(lr, momentum=float(oc.momentum)))
  else:
    raise ValueError(f"optimizer.name={oc.name!r}; valid: adamw, sgd")
  return optax.chain(tx, freeze_heads(frozen_heads))


def init_state(model, tx, rng: jax.Array, image_size: int) -> TrainState:
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = model.init(rng, x)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    batch_stats=variables["batch_stats"],
                    opt_state=tx.init(variables["params"]))


def _head_measures(features, kind):
  """(penalty value of `kind`, mean cosine) between heads; zeros for one head."""
  if features.shape[0] < 2:
    zero = jnp.zeros((), jnp.float32)
    return zero, zero
  return losses.cosine_diversity(features, kind), losses.cosine_diversity(features, "cos")


def train_step(state: TrainState, batch: dict, *, model, tx, penalty_weight: float,
               penalty_kind: str, seed: int, learning_rate_fn=None,
               skip_nonfinite: bool = False):
  """One update. Dropout noise is `fold_in(key(seed), step)`: a resumed run repeats it exactly.

  With `skip_nonfinite`, an update whose loss or gradients hold NaN/inf is dropped (the state
  only advances its step) and reported as `skipped` = 1.
  """
  rng = jax.random.fold_in(jax.random.key(seed), state.step)

  def loss_fn(params):
    (logits, features), updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"], True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    penalty, head_cosine = _head_measures(features, penalty_kind)
    # Without a weight the penalty is still measured (for the diversity report), not trained on.
    loss = ce + penalty_weight * penalty if penalty_weight else ce
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, (updates["batch_stats"], dict(
        loss=loss, cross_entropy=ce, penalty=penalty, head_cosine=head_cosine,
        accuracy=accuracy))

  (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state)
  metrics["learning_rate"] = (learning_rate_fn(state.step) if learning_rate_fn is not None
                              else jnp.zeros((), jnp.float32))
  metrics["skipped"] = jnp.zeros((), jnp.float32)
  if skip_nonfinite:
    finite = jnp.isfinite(loss) & jnp.all(jnp.asarray(
        [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                             state.replace(step=state.step + 1))
    metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
  return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model):
  """Masked sums over one eval batch (padding examples have mask False).

  Returns loss_sum, correct, count and cosine_sum, the (K, K) per-example mean cosine between
  heads summed over real examples; the loop adds these up and divides once at the end.
  """
  logits, features = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                                 batch["image"], False)
  mask = batch["mask"].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  cos = losses.pairwise_cosines(features)          # (K, K, B, H, W)
  per_example = jnp.mean(cos.reshape(cos.shape[:3] + (-1,)), axis=-1)
  return dict(loss_sum=jnp.sum(ce * mask), correct=jnp.sum(correct * mask),
              count=jnp.sum(mask), cosine_sum=jnp.einsum("klb,b->kl", per_example, mask))


def bind_train_step(model, tx, config, learning_rate_fn=None):
  """train_step with everything static bound from a config (penalty, seed)."""
  return functools.partial(
      train_step, model=model, tx=tx, penalty_weight=float(config.penalty.weight),
      penalty_kind=config.penalty.kind, seed=int(config.seed), learning_rate_fn=learning_rate_fn,
      skip_nonfinite=bool(config.skip_nonfinite))
