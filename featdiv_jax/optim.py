"""The optimizer: learning-rate schedule, AdamW/SGD with torch's weight decay, frozen heads.

No TensorFlow, clu or ml_collections here; configs are read by attribute only.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")


def learning_rate_schedule(optimizer_config, total_steps: int,
                           steps_per_epoch: int = 0) -> optax.Schedule:
  """Linear warm-up from 0 (if any), then `cosine` decay or `constant`.

  The cosine reaches 0 at the end of the run, or -- with `decay_epochs` -- follows torch's
  CosineAnnealingLR with T_max = decay_epochs: half a cosine period per T_max, rising again
  after it (the paper's notebooks run 45 epochs with T_max 30, or 30 with T_max 200). With
  `per_epoch` the rate changes once per epoch, as torch's scheduler stepped per epoch does.
  """
  config = optimizer_config
  peak, warmup = config.learning_rate, config.warmup_steps
  if (config.decay_epochs or config.per_epoch) and steps_per_epoch < 1:
    raise ValueError("optimizer.decay_epochs and optimizer.per_epoch need the epoch length "
                     "(steps_per_epoch)")
  if config.schedule == "constant":
    main = optax.constant_schedule(peak)
  elif config.decay_epochs:
    horizon = config.decay_epochs * steps_per_epoch
    main = lambda step: peak * 0.5 * (1.0 + jnp.cos(jnp.pi * step / horizon))
  else:
    main = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1))
  if config.per_epoch:
    by_step = main
    main = lambda step: by_step(step // steps_per_epoch * steps_per_epoch)
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def make_optimizer(optimizer_config, total_steps: int, frozen_heads: Sequence[int] = (),
                   steps_per_epoch: int = 0
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(transformation, its learning-rate schedule): AdamW or SGD with weight decay on every
  parameter (torch's behaviour), the frozen heads' updates zeroed last."""
  lr = learning_rate_schedule(optimizer_config, total_steps, steps_per_epoch)
  decay = optimizer_config.weight_decay
  # decay_norm_and_bias=False: no decay on norm scales/offsets and biases (a mask; with True no
  # mask at all, so the optimizer state keeps the structure older checkpoints have).
  mask = {} if optimizer_config.get("decay_norm_and_bias", True) else {"mask": decayed}
  if optimizer_config.name == "adamw":
    tx = optax.adamw(lr, weight_decay=decay, **mask)
  else:  # sgd: torch adds the decay to the gradient, before momentum
    tx = optax.chain(optax.add_decayed_weights(decay, **mask),
                     optax.sgd(lr, momentum=optimizer_config.momentum))
  return optax.chain(tx, freeze_heads(frozen_heads)), lr


def decayed(params):
  """True for the parameters weight decay applies to without decay_norm_and_bias: those with
  more than one dimension per head (kernels), not 1-D ones (biases, norm scales and offsets).
  Under `heads` the leading axis is the head, so a (K, C) array is 1-D per head."""
  def matrix(path, p):
    per_head = any(getattr(k, "key", None) == "heads" for k in path)
    return p.ndim - per_head > 1
  return jax.tree.map_with_path(matrix, params)


def _head_keep(num_heads: int, frozen_heads: Sequence[int]) -> np.ndarray:
  return (~np.isin(np.arange(num_heads), list(frozen_heads))).astype(np.float32)


def freeze_heads(frozen_heads: Sequence[int]) -> optax.GradientTransformation:
  """Zeroes the updates of the listed heads in every `heads` subtree (leading axis = head).

  Chain it last, after weight decay and the learning rate, so a frozen head's parameters stay
  bit-identical; `MultiHeadNet(frozen_heads=...)` keeps their BatchNorm statistics fixed.
  """
  frozen_heads = tuple(frozen_heads)

  def mask_heads(tree):
    if not frozen_heads:
      return tree
    def mask(path, u):
      if not any(getattr(p, "key", None) == "heads" for p in path):
        return u
      keep = _head_keep(u.shape[0], frozen_heads).reshape((-1,) + (1,) * (u.ndim - 1))
      return jnp.where(keep > 0, u, jnp.zeros_like(u))  # where, not *: 0 * nan is nan
    return jax.tree.map_with_path(mask, tree)

  def update_fn(updates, state, params=None):
    del params
    return mask_heads(updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
