"""The cosine diversity penalty: values, edge cases and gradients."""

import itertools

import jax
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest

from featdiv_jax.losses import (PENALTY_KINDS, cosine_diversity, head_cosine_matrix,
                                pairwise_cosines)


def cka_reference(x, y):
  """Linear CKA of (N, D) arrays by the textbook formula in float64 (Kornblith et al. 2019)."""
  x, y = x - x.mean(0), y - y.mean(0)
  return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def loop_reference(features, kind):
  """One head pair and one position at a time, as the PyTorch reference computes it.

  For `cka` one head pair at a time, over the batch of spatially pooled features.
  """
  f = np.asarray(features, np.float64)
  k = f.shape[0]
  if kind == "cka":
    p = f.mean(axis=tuple(range(2, f.ndim - 1)))
    return np.mean([cka_reference(p[i], p[j]) for i, j in itertools.combinations(range(k), 2)])
  values = []
  for i, j in itertools.combinations(range(k), 2):
    a, b = f[i].reshape(-1, f.shape[-1]), f[j].reshape(-1, f.shape[-1])
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1),
                                       1e-16)
    values.append({"cos": cos, "align": cos, "abs": np.abs(cos), "square": cos ** 2}[kind])
  mean = np.mean(values)
  return 1 - mean if kind == "align" else mean


def random_maps(k, seed=0, relu=True, shape=(3, 4, 5, 6)):
  f = np.random.default_rng(seed).normal(size=(k,) + shape).astype(np.float32)
  return np.maximum(f, 0) if relu else f


@pytest.mark.parametrize("kind", PENALTY_KINDS)
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("relu", [True, False])
def test_matches_per_pair_loop(kind, k, relu):
  f = random_maps(k, seed=k, relu=relu)
  got = jax.jit(cosine_diversity, static_argnames="kind")(f, kind=kind)
  np.testing.assert_allclose(got, loop_reference(f, kind), atol=1e-6)


def test_identical_maps_give_one_and_disjoint_channels_give_zero():
  f = np.abs(random_maps(1)[0]) + 0.1   # no all-zero vectors: those have cosine 0
  same = np.stack([f, f, f])
  np.testing.assert_allclose(cosine_diversity(same), 1.0, atol=1e-6)
  np.testing.assert_allclose(cosine_diversity(same, "align"), 0.0, atol=1e-6)
  disjoint = np.zeros((2,) + f.shape, np.float32)
  disjoint[0, ..., :3] = np.abs(f[..., :3]) + 0.1
  disjoint[1, ..., 3:] = np.abs(f[..., 3:]) + 0.1
  for kind in ("cos", "abs", "square"):
    np.testing.assert_allclose(cosine_diversity(disjoint, kind), 0.0, atol=1e-7)
  np.testing.assert_allclose(cosine_diversity(disjoint, "align"), 1.0, atol=1e-7)


@pytest.mark.parametrize("kind", PENALTY_KINDS)
def test_zero_vectors_give_finite_value_and_gradient(kind):
  f = random_maps(2)
  f[0, 0] = 0.0          # a whole image of head 0 is dead (all-zero after ReLU)
  f[:, 1, 2, 3] = 0.0    # one position dead in both heads
  value, grad = jax.jit(jax.value_and_grad(cosine_diversity), static_argnums=1)(
      jnp.asarray(f), kind)
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(value, loop_reference(f, kind), atol=1e-6)


@pytest.mark.parametrize("kind", PENALTY_KINDS)
def test_gradient_matches_finite_differences(kind):
  # cka compares heads over the batch: at B = 2 it is 1 for any non-constant heads, so the
  # check would compare two zero gradients. B = 4 gives it something to differentiate.
  shape = (4, 2, 2, 4) if kind == "cka" else (2, 2, 2, 4)
  f = jnp.asarray(random_maps(3, seed=1, relu=False, shape=shape))
  jax.test_util.check_grads(jax.jit(lambda x: cosine_diversity(x, kind)), (f,), order=1,
                            modes=("rev",), atol=1e-2, rtol=1e-2)


def test_gradient_step_pushes_heads_apart_and_align_pulls_together():
  f = jnp.asarray(random_maps(2, seed=3)) + 0.5
  for kind, sign in (("cos", -1), ("align", +1)):
    g = jax.grad(cosine_diversity)(f, kind)
    moved = f - 0.5 * g
    before = float(cosine_diversity(f))
    after = float(cosine_diversity(moved))
    assert sign * (after - before) > 1e-3, (kind, before, after)


def test_cosine_matrix_is_symmetric_with_unit_diagonal_and_matches_penalty():
  f = random_maps(3, seed=5)
  m = np.asarray(head_cosine_matrix(f))
  assert m.shape == (3, 3)
  np.testing.assert_allclose(m, m.T, atol=1e-7)
  np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-6)
  np.testing.assert_allclose(m[np.triu_indices(3, 1)].mean(), cosine_diversity(f), atol=1e-6)
  for i, j in [(0, 1), (0, 2), (1, 2)]:
    np.testing.assert_allclose(m[i, j], loop_reference(f[[i, j]], "cos"), atol=1e-6)


def test_pairwise_cosines_shape_and_bfloat16_input():
  f = random_maps(2)
  assert pairwise_cosines(f).shape == (2, 2, 3, 4, 5)
  lo = cosine_diversity(jnp.asarray(f, jnp.bfloat16))
  assert lo.dtype == jnp.float32
  np.testing.assert_allclose(lo, cosine_diversity(f), atol=1e-2)


def test_one_head_and_unknown_kind_are_errors():
  with pytest.raises(ValueError, match="needs num_heads >= 2, got 1.*penalty weight 0"):
    cosine_diversity(random_maps(1))
  with pytest.raises(ValueError, match="unknown penalty kind 'l2'.*cos, abs, square, align"):
    cosine_diversity(random_maps(2), kind="l2")


def test_cka_is_one_for_identical_or_permuted_heads_and_near_zero_for_independent_ones():
  penalty = jax.jit(cosine_diversity, static_argnames="kind")
  f = random_maps(1, shape=(8, 2, 2, 6))[0]
  np.testing.assert_allclose(penalty(np.stack([f, f, f]), "cka"), 1.0, atol=1e-6)
  # The same features in disjoint channels: the channel cosine sees nothing in common, CKA sees
  # the same representation -- the difference the cka kind exists for.
  moved = np.zeros((2, 8, 2, 2, 12), np.float32)
  moved[0, ..., :6], moved[1, ..., 6:] = f, f[..., ::-1]
  np.testing.assert_allclose(penalty(moved, "cos"), 0.0, atol=1e-7)
  np.testing.assert_allclose(penalty(moved, "cka"), 1.0, atol=1e-6)
  independent = random_maps(3, seed=7, relu=False, shape=(400, 1, 1, 4))  # N >> D
  assert float(penalty(independent, "cka")) < 0.05


def test_cka_gradient_step_pushes_heads_apart():
  f = jnp.asarray(random_maps(2, seed=3, shape=(6, 2, 2, 4)))
  f = f.at[1].add(0.5 * f[0])   # correlated heads, so there is something to push apart
  value_and_grad = jax.jit(jax.value_and_grad(lambda x: cosine_diversity(x, "cka")))
  before, grad = value_and_grad(f)
  after, _ = value_and_grad(f - 0.5 * grad)
  assert float(after) < float(before) - 1e-3, (before, after)


def test_cka_with_one_head_is_an_error_and_the_train_step_measures_zero():
  # As for the other kinds: cosine_diversity needs two heads; the train step's measure (what
  # training with one head records) is 0 rather than an error.
  from featdiv_jax.steps import _head_measures
  with pytest.raises(ValueError, match="needs num_heads >= 2, got 1"):
    cosine_diversity(random_maps(1), kind="cka")
  penalty, cosine = _head_measures(jnp.asarray(random_maps(1)), "cka")
  assert float(penalty) == 0.0 and float(cosine) == 0.0
