"""The cosine diversity penalty: values, edge cases and gradients."""

import itertools

import jax
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest

from featdiv_jax.losses import (PENALTY_KINDS, cosine_diversity, head_cosine_matrix,
                                pairwise_cosines)


def loop_reference(features, kind):
  """One head pair and one position at a time, as the PyTorch reference computes it."""
  f = np.asarray(features, np.float64)
  k = f.shape[0]
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
  value, grad = jax.value_and_grad(cosine_diversity)(jnp.asarray(f), kind)
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(value, loop_reference(f, kind), atol=1e-6)


@pytest.mark.parametrize("kind", PENALTY_KINDS)
def test_gradient_matches_finite_differences(kind):
  f = jnp.asarray(random_maps(3, seed=1, relu=False, shape=(2, 2, 2, 4)))
  jax.test_util.check_grads(lambda x: cosine_diversity(x, kind), (f,), order=1,
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
