"""timm weight import: parity with timm on committed fixtures, and the errors it gives.

The fixtures come from `tests/fixtures/make_timm_fixture.py` (tiny timm SE-ResNets with random
weights, randomised BatchNorm statistics and non-zero last-BN gammas, in eval mode).
"""

import functools
import pathlib

import jax
import numpy as np
import pytest

from featdiv_jax.models import (create_model, create_multihead, extract_head, load_timm_weights,
                                place_head, read_state_dict)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@functools.lru_cache(maxsize=None)
def fixture(name):
  io = dict(np.load(FIXTURES / f"{name}_io.npz"))
  # timm's default (non-deep) stem is always 64 wide, whatever stem_width says.
  options = dict(block=str(io["block"][0]), stage_sizes=tuple(io["layers"]),
                 widths=tuple(io["channels"]), stem_width=64)
  return io, options


def nchw_to_nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


# Measured against timm (float32, CPU): the largest difference is at most 7e-7 of the output's
# largest magnitude, for logits and feature maps alike. The bound leaves room for other CPUs and
# XLA versions; a wrong layout, BatchNorm eps or SE width moves outputs by 1e-3 or more.
SCALE_RTOL = 5e-6


def assert_matches(got, want, what):
  """Every element within SCALE_RTOL x max|want| (elementwise rtol fails near zero)."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, what
  error, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
  assert error <= SCALE_RTOL * scale, f"{what}: max error {error:.2e} of scale {scale:.2e}"


@pytest.mark.parametrize("conv_impl", ["xla", "im2col"])
@pytest.mark.parametrize("name", ["tiny_basic", "tiny_bottleneck"])
def test_imported_model_matches_timm_logits_and_features(name, conv_impl):
  io, options = fixture(name)
  options = dict(options, conv_impl=conv_impl)
  variables = load_timm_weights(FIXTURES / f"{name}.safetensors", "seresnet18", **options)
  classifier = create_model("seresnet18", int(io["num_classes"]), **options)
  features_only = create_model("seresnet18", 0, **options)
  for size in (64, 45):
    x = nchw_to_nhwc(io[f"input_{size}"])
    logits = jax.jit(classifier.apply)(variables, x)
    assert_matches(logits, io[f"logits_{size}"], f"logits {size}")
    features = jax.jit(features_only.apply)(variables, x)
    assert_matches(features, nchw_to_nhwc(io[f"features_{size}"]), f"features {size}")


def test_npz_and_mapping_sources_load_the_same():
  io, options = fixture("tiny_basic")
  state = read_state_dict(FIXTURES / "tiny_basic.safetensors")
  from_map = load_timm_weights({f"module.{k}": v for k, v in state.items()}, "seresnet18",
                               **options)
  from_file = load_timm_weights(FIXTURES / "tiny_basic.safetensors", "seresnet18", **options)
  jax.tree.map(np.testing.assert_array_equal, from_map, from_file)
  assert from_file["params"]["fc"]["kernel"].shape == (64, int(io["num_classes"]))


def test_imported_timm_model_becomes_head_k_of_a_multihead_net():
  io, options = fixture("tiny_basic")
  head = load_timm_weights(FIXTURES / "tiny_basic.safetensors", "seresnet18", **options)
  net = create_multihead("seresnet18", 3, 10, **options)
  x = nchw_to_nhwc(io["input_64"])
  variables = place_head(jax.jit(net.init)(jax.random.key(0), x), head, 1)
  _, features = jax.jit(net.apply)(variables, x)
  assert_matches(features[1], nchw_to_nhwc(io["features_64"]), "head 1's features")
  assert not np.allclose(features[0], features[1], atol=1e-2)
  jax.tree.map(np.testing.assert_array_equal, extract_head(variables, 1),
               {c: {k: v for k, v in head[c].items() if k != "fc"} for c in head})


def test_wrong_arch_names_missing_and_unexpected_keys():
  _, options = fixture("tiny_basic")
  with pytest.raises(ValueError, match=r"missing keys: layer1\.0\.conv3\.weight|shape mismatch"):
    load_timm_weights(FIXTURES / "tiny_basic.safetensors", "seresnet18",
                      **dict(options, block="bottleneck"))
  # the fixture has two blocks in stage 1; a one-block model leaves layer1.1 unused
  with pytest.raises(ValueError, match=r"unexpected keys: layer1\.1\."):
    load_timm_weights(FIXTURES / "tiny_basic.safetensors", "seresnet18",
                      **dict(options, stage_sizes=(1, 1, 1, 1)))
  with pytest.raises(ValueError, match="unknown arch 'seresnet19'"):
    load_timm_weights(FIXTURES / "tiny_basic.safetensors", "seresnet19")


def test_misshaped_key_names_key_and_both_shapes():
  _, options = fixture("tiny_basic")
  state = read_state_dict(FIXTURES / "tiny_basic.safetensors")
  state["layer2.0.conv1.weight"] = state["layer2.0.conv1.weight"][:, :, :1, :1]
  with pytest.raises(ValueError, match=r"layer2\.0\.conv1\.weight: file has \(16, 8, 1, 1\), "
                                       r"seresnet18 needs \(16, 8, 3, 3\)"):
    load_timm_weights(state, "seresnet18", **options)
  del state["bn1.running_var"]
  with pytest.raises(ValueError, match=r"missing keys: bn1\.running_var \(expected shape \(64,\)\)"):
    load_timm_weights(state, "seresnet18", **options)


def test_bad_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.safetensors"):
    load_timm_weights(tmp_path / "nope.safetensors", "seresnet18")
  bad = tmp_path / "weights.pt"
  bad.write_bytes(b"\0")
  with pytest.raises(ValueError, match=r"weights\.pt.*\.safetensors or \.npz"):
    load_timm_weights(bad, "seresnet18")
