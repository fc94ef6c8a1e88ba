"""The cosine diversity penalty between the K heads' feature maps.

Feature maps (K, B, H, W, C) are unit-normalised along C; every pair of heads is compared at
every spatial position with one einsum. After a ReLU the maps are non-negative, so cosines lie in
[0, 1]: minimising their mean (`cos`) pushes the heads towards disjoint channel use.

The `cka` kind is the exception: it compares representations, not positions -- the linear CKA
of `analysis.head_cka_matrix` between the heads' spatially pooled features over the batch.
"""

import jax
import jax.numpy as jnp
import numpy as np

from featdiv_jax import analysis

PENALTY_KINDS = ("cos", "abs", "square", "align", "cka")


def _unit(features: jax.Array, eps: float) -> jax.Array:
  # rsqrt(max(|f|^2, eps^2)): a zero vector stays zero with a finite gradient, as torch's
  # F.cosine_similarity clamps its norms at eps.
  f = features.astype(jnp.float32)
  sq = jnp.sum(f * f, axis=-1, keepdims=True)
  return f * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def pairwise_cosines(features: jax.Array, eps: float = 1e-8) -> jax.Array:
  """(K, B, ..., C) -> (K, K, B, ...): cosine between heads k and l at every position."""
  u = _unit(features, eps)
  return jnp.einsum("k...c,l...c->kl...", u, u)


def head_cosine_matrix(features: jax.Array, eps: float = 1e-8) -> jax.Array:
  """(K, K) mean cosine between every pair of heads, for reports (diagonal 1 but at zero maps)."""
  cos = pairwise_cosines(features, eps)
  return jnp.mean(cos.reshape(cos.shape[0], cos.shape[1], -1), axis=-1)


def cosine_diversity(features: jax.Array, kind: str = "cos", eps: float = 1e-8) -> jax.Array:
  """Scalar penalty over the K(K-1)/2 distinct head pairs, averaged over B and positions.

  kind: `cos` mean cosine (minimised: pushes heads apart; the default), `abs` mean |cos|,
  `square` mean cos^2 (both push towards orthogonal), `align` 1 - mean cosine (the reference
  CIFAR script's sign, which pulls heads together; kept for ablation).

  `cka` is a representation-level kind (the function keeps its name, which callers use): the
  mean linear CKA over head pairs between the heads' pooled (spatial mean) features over the B
  examples of the batch (`analysis.head_cka_matrix`; `eps` is unused). Minimising it pushes the
  heads to arrange the images differently, which a channel permutation or rotation cannot fake,
  unlike the channel-overlap kinds. It needs a batch of several examples (at B = 2 any two
  heads score 1) and scores 0 for a head whose pooled features are constant over the batch.
  """
  if kind not in PENALTY_KINDS:
    raise ValueError(f"unknown penalty kind {kind!r}; valid: {', '.join(PENALTY_KINDS)}")
  num_heads = features.shape[0]
  if num_heads < 2:
    raise ValueError(
        f"the cosine diversity penalty compares heads and needs num_heads >= 2, got "
        f"{num_heads}; use penalty weight 0 for a single head")
  rows, cols = np.triu_indices(num_heads, k=1)
  if kind == "cka":
    return jnp.mean(analysis.head_cka_matrix(features)[rows, cols])
  cos = pairwise_cosines(features, eps)[rows, cols]
  if kind == "abs":
    cos = jnp.abs(cos)
  elif kind == "square":
    cos = jnp.square(cos)
  value = jnp.mean(cos)
  return 1.0 - value if kind == "align" else value
