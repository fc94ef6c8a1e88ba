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
  return pooled_cka_matrix(pooled(features))


def pooled_cka_matrix(pooled_features: jax.Array) -> jax.Array:
  """(K, N, C) pooled features of N examples -> (K, K) linear CKA between the heads.

  Formed in example space (K Grams of N x N) for a batch, and in feature space (K x K cross
  covariances of C x C) when N exceeds C, as over a whole eval split: the same value, in
  memory linear in N.
  """
  centred = _centred(pooled_features)                                        # (K, N, C)
  n, c = centred.shape[1:]
  if n > c:
    cross = jnp.einsum("knc,lnd->klcd", centred, centred, precision=_HIGHEST)  # (K, K, C, C)
    inner = jnp.sum(jnp.square(cross), axis=(2, 3))
  else:
    grams = jnp.einsum("kac,kbc->kab", centred, centred, precision=_HIGHEST)  # (K, N, N)
    inner = jnp.einsum("kab,lab->kl", grams, grams, precision=_HIGHEST)       # (K, K)
  diag = jnp.diagonal(inner)
  return _safe_ratio(inner, diag[:, None], diag[None, :])


def off_diagonal_mean(matrix) -> float | None:
  """The mean of a K x K matrix's off-diagonal entries (None for K = 1): the heads' mean
  pairwise similarity."""
  m = np.asarray(matrix, np.float64)
  k = m.shape[0]
  return float(m[~np.eye(k, dtype=bool)].mean()) if k > 1 else None


def ablation_accuracies(ablation_correct, count: float) -> list | None:
  """K accuracies of the model with head k's map replaced by its batch mean (None for K = 1:
  with one head nothing is left to classify from, so the number says nothing about heads)."""
  correct = np.asarray(ablation_correct, np.float64)
  if correct.shape[0] < 2:
    return None
  return [float(c) / max(float(count), 1.0) for c in correct]


# The probe's L2 strength (scikit-learn's C, on standardised features) and iteration budget.
PROBE_C = 1.0
PROBE_MAX_ITER = 1000


def linear_probe_accuracy(train_x, train_y, test_x, test_y) -> float | None:
  """Accuracy on (test_x, test_y) of a multinomial logistic regression fitted on (train_x,
  train_y): how linearly decodable the classes are from a representation.

  Features are standardised with the training examples' mean and std (constant features stay
  0); L2 strength C = PROBE_C, L-BFGS for at most PROBE_MAX_ITER iterations, in float64.
  Deterministic: the same inputs give the same accuracy. None when the training examples hold
  fewer than two classes (nothing to fit). scikit-learn is imported here, not at the top:
  the training step does not need it. The fit runs on one BLAS thread: at these sizes more
  threads only contend with the training process's own (measured 10-20x slower on 2 busy
  cores), and one thread sums in one order.
  """
  # pylint: disable=import-outside-toplevel
  import warnings
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.linear_model import LogisticRegression
  from threadpoolctl import threadpool_limits
  train_x = np.asarray(train_x, np.float64).reshape(len(train_y), -1)
  test_x = np.asarray(test_x, np.float64).reshape(len(test_y), -1)
  if len(np.unique(train_y)) < 2 or not len(test_y):
    return None
  mean, std = train_x.mean(0), train_x.std(0)
  std = np.where(std > 1e-12 * np.maximum(np.abs(mean), 1.0), std, 1.0)
  probe = LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER)
  with warnings.catch_warnings(), threadpool_limits(1):
    # Hitting the iteration budget still gives a usable (slightly under-fitted) probe.
    warnings.simplefilter("ignore", ConvergenceWarning)
    probe.fit((train_x - mean) / std, np.asarray(train_y))
  return float(probe.score((test_x - mean) / std, np.asarray(test_y)))


def head_probe_accuracies(train_pooled, train_labels, test_pooled, test_labels) -> tuple:
  """(per-head probe accuracies [K], probe accuracy on all heads concatenated) from (K, N, C)
  pooled features of training and test examples. For K = 1 both describe the one head."""
  train_pooled, test_pooled = np.asarray(train_pooled), np.asarray(test_pooled)
  per_head = [linear_probe_accuracy(train_pooled[k], train_labels, test_pooled[k], test_labels)
              for k in range(train_pooled.shape[0])]
  if train_pooled.shape[0] == 1:
    return per_head, per_head[0]
  def concat(p):
    return np.transpose(p, (1, 0, 2)).reshape(p.shape[1], -1)
  return per_head, linear_probe_accuracy(concat(train_pooled), train_labels,
                                         concat(test_pooled), test_labels)
