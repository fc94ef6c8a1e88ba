"""Optimizer pieces that know about the stacked head axis."""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


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
