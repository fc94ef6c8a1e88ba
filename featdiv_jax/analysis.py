"""Representation similarity between the K heads: linear CKA over a batch of pooled features.

The training penalty (`losses.cosine_diversity`) compares the heads' feature vectors position by
position, so after a ReLU it measures how much the heads' *channels* overlap. Heads can score a
low cosine there and still compute the same function of the image -- for instance by using the
same features in permuted or disjoint channels. Linear CKA (centred kernel alignment, Kornblith
et al. 2019, ICML, "Similarity of Neural Network Representations Revisited") asks instead
whether two heads represent the *images* alike: it compares how each head arranges a batch of
examples, and is invariant to orthogonal transformations (channel permutations included) and
isotropic scaling of either representation. So these measures answer whether the penalty made
the heads learn different representations, not only non-overlapping channels.

Only jax and numpy here (no TensorFlow): `losses` imports this module for its `cka` kind.
"""

import jax
import jax.numpy as jnp
import numpy as np

# Products below are reduced to scalars that divide each other; on GPUs the default float32
# matmul precision (TF32, 10-bit mantissa) would put ~1e-3 errors into a similarity in [0, 1].
_HIGHEST = jax.lax.Precision.HIGHEST


def _compute_dtype(x: jax.Array):
  """float32 at least: bf16 sums of squares lose most digits; float64 stays float64."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _centred(x: jax.Array) -> jax.Array:
  """(..., N, D) -> the same, each column centred over N and the whole matrix rescaled.

  Shifting by the first example before the mean makes a constant column exactly zero (x - x[0]
  is exact when the values are equal), where `x - mean(x)` would leave rounding residue that
  CKA, being scale-free, could turn into a similarity. It also avoids cancellation when a
  feature's mean dwarfs its spread. Dividing by the largest |entry| keeps the fourth powers that
  CKA sums far from float32 overflow and underflow; after it a non-constant input has a centred
  norm of at least 1/sqrt(N + 1), as |shifted|^2 = |centred|^2 + N |centred row 0|^2.

  The divisor is a stop_gradient: CKA is invariant to scaling (homogeneous of degree 0, so its
  gradient is orthogonal to its input), which makes the gradient through the divisor exactly 0,
  and leaving it out keeps an all-constant input's gradient finite (0) rather than NaN.
  """
  x = jnp.asarray(x)
  x = x.astype(_compute_dtype(x))
  shifted = x - x[..., :1, :]
  peak = jnp.max(jnp.abs(shifted), axis=(-2, -1), keepdims=True)
  scaled = shifted / jax.lax.stop_gradient(jnp.maximum(peak, jnp.finfo(x.dtype).tiny))
  return scaled - jnp.mean(scaled, axis=-2, keepdims=True)


def _floor(dtype) -> float:
  """sqrt of the smallest normal number: rsqrt's derivative (x^-1.5 / 2) is finite above it."""
  return float(np.sqrt(np.finfo(dtype).tiny))


def _safe_ratio(cross, self_x, self_y):
  """cross / sqrt(self_x * self_y), 0 where either self-similarity is 0 (a constant input).

  The where is applied to the denominators as well as to the result so that the gradient at a
  constant input is 0, not NaN (jnp.where alone passes the NaN of the unused branch's gradient).
  The square roots are taken separately: their product cannot underflow. After `_centred` a
  non-constant input's self-similarity is at least about 1 / (N^2 min(N, D)), far above the
  floor for any batch or data set size.
  """
  floor = _floor(cross.dtype)
  degenerate = (self_x <= floor) | (self_y <= floor)
  inv_x = jax.lax.rsqrt(jnp.where(self_x <= floor, 1.0, self_x))
  inv_y = jax.lax.rsqrt(jnp.where(self_y <= floor, 1.0, self_y))
  return jnp.where(degenerate, 0.0, cross * inv_x * inv_y)


def linear_cka(x: jax.Array, y: jax.Array) -> jax.Array:
  """Linear CKA between representations x (N, D1) and y (N, D2) of the same N examples.

  CKA = |Yc^T Xc|_F^2 / (|Xc^T Xc|_F |Yc^T Yc|_F), with Xc, Yc centred over the N examples
  (Kornblith et al. 2019). It lies in [0, 1]: 1 for identical features, and for features that
  differ by an orthogonal transformation (a rotation, a channel permutation) or an isotropic
  scaling; near 0 for independent features when N >> D (for N ~ D even independent random
  features score well above 0, so compare values at equal N and D). A constant input (all zero
  after centring) has no similarity to speak of and gives 0, never NaN.

  Computed in float32 at least (bf16 inputs are upcast) and returned as a scalar of that
  dtype, for inputs of any scale float32 holds (1e-20 to 1e20 alike). Jit-able and
  differentiable; the gradient is finite, and 0 at a constant input. The products are formed in
  feature space (D1 x D2) when N exceeds both widths, and otherwise in example space (N x N Gram
  matrices, the same value by |Yc^T Xc|_F^2 = <Xc Xc^T, Yc Yc^T>_F), the smaller of the two.
  """
  x, y = jnp.asarray(x), jnp.asarray(y)  # numpy float64 becomes float32 unless x64 is on
  if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
    raise ValueError(f"linear_cka needs (N, D1) and (N, D2) arrays, got {x.shape} and {y.shape}")
  dtype = jnp.promote_types(_compute_dtype(x), _compute_dtype(y))
  xc, yc = _centred(x.astype(dtype)), _centred(y.astype(dtype))
  if x.shape[0] > max(x.shape[1], y.shape[1]):
    def sq_norm(a, b):
      return jnp.sum(jnp.square(jnp.einsum("na,nb->ab", a, b, precision=_HIGHEST)))
    return _safe_ratio(sq_norm(xc, yc), sq_norm(xc, xc), sq_norm(yc, yc))
  gx = jnp.einsum("na,ma->nm", xc, xc, precision=_HIGHEST)
  gy = jnp.einsum("na,ma->nm", yc, yc, precision=_HIGHEST)
  return _safe_ratio(jnp.sum(gx * gy), jnp.sum(gx * gx), jnp.sum(gy * gy))


def pooled(features: jax.Array) -> jax.Array:
  """(K, B, H, W, C) -> (K, B, C): each head's spatial mean, the vector its classifier pools.

  The mean is taken in float32 at least: a bf16 sum over H * W positions would round away the
  differences between examples that CKA measures. Any number of spatial axes (none included)
  between B and C is averaged.
  """
  f = jnp.asarray(features)
  f = f.astype(_compute_dtype(f))
  return jnp.mean(f, axis=tuple(range(2, f.ndim - 1)))


def head_cka_matrix(features: jax.Array) -> jax.Array:
  """(K, B, H, W, C) -> (K, K): linear CKA between every pair of heads' pooled features.

  Over the B examples of the batch, so B must be well above 1 for the value to mean anything
  (B = 2 leaves one centred direction per head, and any two non-constant heads score 1). The
  diagonal is 1, but 0 for a head whose pooled features are constant over the batch (a dead
  head); the matrix is symmetric.

  One vectorised computation: per head the B x B Gram matrix of its centred pooled features,
  then all K x K Frobenius inner products of those Grams in one einsum
  (<G_k, G_l>_F = |P_l^T P_k|_F^2), normalised by the diagonal.
  """
  centred = _centred(pooled(features))                                     # (K, B, C)
  grams = jnp.einsum("kac,kbc->kab", centred, centred, precision=_HIGHEST)  # (K, B, B)
  inner = jnp.einsum("kab,lab->kl", grams, grams, precision=_HIGHEST)       # (K, K)
  diag = jnp.diagonal(inner)
  return _safe_ratio(inner, diag[:, None], diag[None, :])
