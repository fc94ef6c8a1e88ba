"""Linear CKA and the heads' CKA matrix (invariances, an exact case, degenerate inputs), head
ablations and linear probes, and how evaluation reports them."""

import itertools

import jax
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest

from featdiv_jax import analysis, evaluation, models
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


@pytest.mark.parametrize("n", [40, 5])  # N > C: feature space; N < C: example space
def test_pooled_matrix_over_a_split_matches_the_float64_formula_in_either_space(n):
  p = gaussian(3, n, 6, seed=10)
  p[2] = p[0] @ gaussian(6, 6, seed=11) + 0.3 * p[1]  # related to both, not a rotation
  m = np.asarray(analysis.pooled_cka_matrix(p))
  for i, j in itertools.product(range(3), repeat=2):
    np.testing.assert_allclose(m[i, j], np_cka(p[i], p[j]), atol=2e-5)
  assert analysis.off_diagonal_mean(m) == pytest.approx(
      (m.astype(np.float64).sum() - np.trace(m.astype(np.float64))) / 6, abs=1e-9)
  assert analysis.off_diagonal_mean(m[:1, :1]) is None


def blobs(n, d, classes, seed, separation=10.0):
  """Gaussian blobs: class c's mean is `separation` along axis c."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, n)
  x = rng.normal(size=(n, d))
  x[np.arange(n), labels] += separation
  return x, labels


def test_a_probe_on_separable_features_is_exact_and_deterministic():
  x, y = blobs(300, 8, 4, seed=0)
  xt, yt = blobs(200, 8, 4, seed=1)
  assert analysis.linear_probe_accuracy(x * 1e3 + 5, y, xt * 1e3 + 5, yt) == 1.0  # scale-free
  noise, noise_t = gaussian(300, 8, seed=2), gaussian(200, 8, seed=3)
  chance = analysis.linear_probe_accuracy(noise, y, noise_t, yt)
  assert chance < 0.45   # 4 classes: 0.25 expected
  assert analysis.linear_probe_accuracy(noise, y, noise_t, yt) == chance
  assert analysis.linear_probe_accuracy(x, np.zeros_like(y), xt, yt) is None  # one class


def test_head_probes_tell_a_useful_head_from_a_useless_one_and_read_all_heads_together():
  x, y = blobs(300, 8, 4, seed=4, separation=2.0)      # informative, not perfectly
  xt, yt = blobs(200, 8, 4, seed=5, separation=2.0)
  noise, noise_t = gaussian(300, 8, seed=6), gaussian(200, 8, seed=7)
  per_head, together = analysis.head_probe_accuracies(
      np.stack([x, noise]), y, np.stack([xt, noise_t]), yt)
  assert per_head[0] > 0.6 and per_head[1] < 0.45
  assert together >= per_head[0] - 0.05   # the useless head adds (almost) nothing
  single, alone = analysis.head_probe_accuracies(x[None], y, xt[None], yt)
  assert single == [per_head[0]] and alone == per_head[0]


def tiny_multihead(num_heads=2):
  model = models.create_multihead("seresnet_tiny", num_heads, 3, classifier="flatten_mlp",
                                  hidden=8, dropout=0.0)
  x = gaussian(6, 16, 16, 3, seed=12)
  variables = model.init(jax.random.key(0), x)
  return model, variables, x


def test_ablating_a_constant_head_changes_nothing_and_ablating_a_live_one_does():
  model, variables, x = tiny_multihead()
  # Head 1 with every parameter 0 (its running means are 0) outputs the constant map 0.
  params = dict(variables["params"], heads=jax.tree.map(lambda a: a.at[1].set(0.0),
                                                         variables["params"]["heads"]))
  variables = dict(variables, params=params)
  mask = np.array([True] * 5 + [False])
  logits, features, ablated = model.apply(variables, x, False, ablation_mask=mask)
  assert ablated.shape == (2, 6, 3)
  np.testing.assert_array_equal(np.asarray(features[1]), 0.0)
  np.testing.assert_array_equal(np.asarray(ablated[1]), np.asarray(logits))  # zero drop
  assert np.abs(np.asarray(ablated[0]) - np.asarray(logits)).max() > 1e-4
  # The replacement is the mean over masked-in examples: a masked-out one does not move it.
  other = x.copy()
  other[5] = gaussian(16, 16, 3, seed=13) * 5
  again = model.apply(variables, other, False, ablation_mask=mask)[2]
  np.testing.assert_allclose(np.asarray(again[:, :5]), np.asarray(ablated[:, :5]), atol=1e-6)
  # ... and a masked-in one does.
  moved = model.apply(variables, other, False, ablation_mask=np.ones(6, bool))[2]
  assert np.abs(np.asarray(moved[0, :5]) - np.asarray(ablated[0, :5])).max() > 1e-4
  labels = np.argmax(np.asarray(logits), -1)   # the full model is right on every example
  correct = (np.argmax(np.asarray(ablated), -1) == labels)[:, :5].sum(1)
  accuracy = analysis.ablation_accuracies(correct, 5)
  assert accuracy[1] == 1.0 and accuracy[0] <= 1.0
  assert analysis.ablation_accuracies(correct[:1], 5) is None  # one head: nothing to ablate


def test_the_eval_line_and_tensorboard_scalars_show_the_heads():
  entry = dict(eval_accuracy=0.9, eval_head_cosine=0.0123, eval_head_cka=0.4567,
               eval_head_ablation_drop=[0.092, 0.11], eval_head_probe_accuracy=[0.961, 0.958],
               eval_probe_all_accuracy=0.975, eval_head_cka_matrix=[[1, 0.4], [0.4, 1]])
  assert evaluation.console_line(entry) == (
      "heads: cos 0.012, CKA 0.457, ablation drop 9.2/11.0 pts, probe 96.1/95.8% (all 97.5%)")
  assert evaluation.console_line(dict(eval_accuracy=0.9, eval_head_cosine=None)) == ""
  scalars = evaluation.scalars(dict(entry, eval_head_ablation_accuracy=None))
  assert scalars["eval_head_probe_accuracy/1"] == 0.958
  assert "eval_head_cka_matrix" not in scalars and "eval_head_ablation_accuracy" not in scalars
