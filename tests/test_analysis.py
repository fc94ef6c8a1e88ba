"""Linear CKA and the heads' CKA matrix: invariances, an exact case, degenerate inputs."""

import itertools

import jax
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest

from featdiv_jax.analysis import head_cka_matrix, linear_cka, pooled


def np_cka(x, y):
  """The textbook formula in float64, as an independent reference."""
  x = np.asarray(x, np.float64) - np.mean(x, 0)
  y = np.asarray(y, np.float64) - np.mean(y, 0)
  return (np.linalg.norm(y.T @ x) ** 2
          / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def gaussian(*shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_one_for_identical_rotated_scaled_and_shifted_features():
  x = gaussian(50, 8)
  q, _ = np.linalg.qr(gaussian(8, 8, seed=1).astype(np.float64))
  np.testing.assert_allclose(linear_cka(x, x), 1.0, atol=1e-6)
  np.testing.assert_allclose(linear_cka(x, (x @ q).astype(np.float32)), 1.0, atol=1e-5)
  np.testing.assert_allclose(linear_cka(x, 3.7 * x + 5.0), 1.0, atol=1e-5)
  np.testing.assert_allclose(linear_cka(1e-20 * x, 1e20 * x), 1.0, atol=1e-5)  # no overflow


def test_near_zero_for_independent_features_when_n_much_larger_than_d():
  value = float(linear_cka(gaussian(2000, 5, seed=2), gaussian(2000, 5, seed=3)))
  assert 0 <= value < 0.05, value


def test_exact_value_for_one_of_two_orthogonal_columns():
  # a, b centred, orthogonal, |a|^2 = |b|^2 = s: X^T X = s I_2, so |X^T X|_F = s sqrt(2),
  # |a^T a| = s and |a^T X|_F^2 = s^2, giving CKA([a, b], a) = s^2 / (s sqrt(2) s) = 1/sqrt(2).
  a = np.array([1., -1., 1., -1.], np.float32)
  b = np.array([1., 1., -1., -1.], np.float32)
  x, y = np.stack([a, b], 1), a[:, None]
  np.testing.assert_allclose(linear_cka(x, y), 1 / np.sqrt(2), rtol=1e-6)
  np.testing.assert_allclose(linear_cka(y, x), 1 / np.sqrt(2), rtol=1e-6)
  np.testing.assert_allclose(linear_cka(x + 10, 2 * y - 3), 1 / np.sqrt(2), rtol=1e-6)


@pytest.mark.parametrize("n, d1, d2", [(40, 3, 5), (4, 6, 7)])  # feature space, Gram space
def test_matches_float64_reference_and_gradient_checks(n, d1, d2):
  x, y = gaussian(n, d1, seed=4), gaussian(n, d2, seed=5)
  np.testing.assert_allclose(jax.jit(linear_cka)(x, y), np_cka(x, y), rtol=1e-5)
  jax.test_util.check_grads(jax.jit(linear_cka), (jnp.asarray(x), jnp.asarray(y)), order=1,
                            modes=("rev",), atol=1e-2, rtol=1e-2)


def test_constant_input_gives_zero_with_finite_gradient():
  y = gaussian(10, 3)
  value_and_grad = jax.jit(jax.value_and_grad(linear_cka, argnums=(0, 1)))
  for const in (np.full((10, 4), 0.1, np.float32), np.zeros((10, 4), np.float32)):
    # In float32 the mean of ten 0.1s is not 0.1: plain centring leaves a residue (1.5e-8)
    # that CKA, being scale-free, must not turn into a similarity.
    value, grads = value_and_grad(const, y)
    assert float(value) == 0.0
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert float(value_and_grad(const, const)[0]) == 0.0


def test_bfloat16_is_upcast():
  x, y = gaussian(30, 4, seed=6), gaussian(30, 4, seed=7) + gaussian(30, 4, seed=6)
  lo = linear_cka(jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16))
  assert lo.dtype == jnp.float32
  np.testing.assert_allclose(lo, np_cka(x, y), atol=2e-2)


def test_head_matrix_matches_pairwise_loop_symmetric_unit_diagonal_and_jits():
  f = np.maximum(gaussian(3, 6, 2, 3, 5, seed=8), 0)
  f[2] = 0.5 * f[0] + f[1]   # a head that mixes the other two: CKA well away from 0 and 1
  p = np.asarray(pooled(f))
  np.testing.assert_allclose(p, f.mean(axis=(2, 3)), atol=1e-6)
  m = np.asarray(jax.jit(head_cka_matrix)(f))
  assert m.shape == (3, 3)
  np.testing.assert_allclose(m, m.T, atol=1e-6)
  np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-6)
  for i, j in itertools.product(range(3), repeat=2):
    np.testing.assert_allclose(m[i, j], linear_cka(p[i], p[j]), atol=1e-6)
    np.testing.assert_allclose(m[i, j], np_cka(p[i], p[j]), atol=1e-5)


def test_dead_head_gives_zero_row_not_nan():
  f = gaussian(2, 4, 2, 2, 3, seed=9)
  f[1] = 0.0
  m = np.asarray(head_cka_matrix(f))
  np.testing.assert_array_equal(m[1], 0.0)
  np.testing.assert_array_equal(m[:, 1], 0.0)
  assert m[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match=r"\(N, D1\) and \(N, D2\)"):
    linear_cka(gaussian(5, 2), gaussian(6, 2))
