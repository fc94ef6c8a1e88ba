"""featdiv_jax.visualize on tiny digits runs: a PNG of the documented size for K=2
(imagenet stem, 1x1 maps) and K=1 (cifar stem, 4x4 maps), the maps it draws, and every mistake
one line, exit status 1, nothing written."""

import os
import pathlib
import struct

import numpy as np
import pytest

from featdiv_jax import visualize
from tests_util import load_config, save_random_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def saved_run(tmp_path_factory, digits_dir, name, arg, **overrides):
  """A smoke run's workdir as the training loop leaves it -- config.json and checkpoints at
  steps 1 and 2 of the train state its Trainer builds, saved the loop's way -- with random
  values in place of trained ones (BatchNorm statistics too): what visualize reads is the same,
  and no train step has to compile (training the two runs costs minutes on 2 busy cores)."""
  workdir = str(tmp_path_factory.mktemp(name))
  config = load_config("digits", arg, **{"dataset.data_dir": digits_dir, **overrides})
  save_random_run(workdir, config, [1, 2])
  return workdir


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory, digits_dir):
  """2-head multi_cos, imagenet stem: 32x32 images give 1x1 final maps."""
  return saved_run(tmp_path_factory, digits_dir, "multi", "multi_cos,smoke")


@pytest.fixture(scope="module")
def one_head_cifar(tmp_path_factory, digits_dir):
  """`single` (one head), cifar stem: 32x32 images give 4x4 final maps."""
  return saved_run(tmp_path_factory, digits_dir, "single", "single,smoke",
                   **{"model.stem": "cifar"})


def snapshot(directory):
  return sorted((str(p), p.stat().st_mtime_ns) for p in pathlib.Path(directory).rglob("*"))


def png_size(path):
  """(width, height) from the PNG's IHDR chunk, after checking the signature."""
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
  return struct.unpack(">II", head[16:24])


def test_figure_size_is_the_documented_formula():
  # (1 + 2K) columns and N rows of 160-pixel panels (PANEL_INCHES * DPI).
  assert visualize.figure_size(8, 2) == (5 * 160, 8 * 160)
  assert visualize.figure_size(1, 1) == (3 * 160, 160)
  assert visualize.figure_size(3, 4) == (9 * 160, 3 * 160)


@pytest.mark.parametrize("images,run", [(3, "two_heads"), (2, "one_head_cifar")])
def test_writes_a_png_of_the_documented_size(images, run, request, tmp_path, capsys):
  workdir = request.getfixturevalue(run)
  before = snapshot(workdir)
  out = str(tmp_path / "heads.png")
  argv = ["--workdir", workdir, "--images", str(images), "--out", out]
  if run == "one_head_cifar":
    argv += ["--split", "train[:5]", "--step", "1"]
  assert visualize.main(argv) == 0
  num_heads, feature_map = (2, "1x1x64") if run == "two_heads" else (1, "4x4x64")
  assert png_size(out) == visualize.figure_size(images, num_heads) == (
      (1 + 2 * num_heads) * 160, images * 160)
  line = capsys.readouterr().out.splitlines()[-1]  # after TFDS's first preparation of digits
  assert line.endswith(
      f"{out} ({(1 + 2 * num_heads) * 160}x{images * 160} px)")
  assert f"{num_heads} head(s) with {feature_map} feature maps" in line
  assert os.listdir(tmp_path) == ["heads.png"]  # no temporary file left
  assert snapshot(workdir) == before


@pytest.mark.parametrize("size", [4, 1])
def test_head_maps_upsample_the_channel_mean_and_the_strongest_channel(size):
  rng = np.random.default_rng(0)
  k, b, c, image_size = 2, 3, 5, 16
  features = rng.uniform(0, 1, (k, b, size, size, c)).astype(np.float32)
  features[0, 1, ..., 3] += 2.0  # head 0, image 1: channel 3 strongest, then the others
  features[1, :, ..., 0] += 1.0
  features[1, :, ..., 4] += 3.0  # head 1: channel 4, then 0, on every image
  maps = visualize.head_maps(features, image_size)
  assert maps.mean.shape == maps.strongest.shape == (k, b, image_size, image_size)
  assert maps.channels.shape == (k, b, 3)
  assert maps.channels[0, 1, 0] == 3 and (maps.channels[1, :, :2] == [4, 0]).all()
  means = features.mean(axis=(2, 3))
  np.testing.assert_array_equal(maps.channels, np.argsort(-means, axis=-1)[..., :3])
  if size == 1:  # one value, spread over the whole image
    np.testing.assert_allclose(maps.mean, np.broadcast_to(
        features.mean(-1), maps.mean.shape), rtol=1e-6)
    np.testing.assert_allclose(maps.strongest[1], np.broadcast_to(
        features[1, ..., 4], maps.strongest[1].shape), rtol=1e-6)
  else:  # bilinear: within the map's range, each 4x4 block's centre near its cell's value
    mean_map = features.mean(-1)
    assert maps.mean.min() >= mean_map.min() - 1e-6 and maps.mean.max() <= mean_map.max() + 1e-6
    centre = maps.mean[:, :, 1::4, 1::4] + maps.mean[:, :, 2::4, 2::4]
    assert np.abs(centre / 2 - mean_map).max() < 0.5 * np.ptp(mean_map)
    strongest = np.take_along_axis(features, maps.channels[..., None, None, :1], -1)[..., 0]
    assert np.corrcoef(maps.strongest[:, :, 2::4, 2::4].ravel(), strongest.ravel())[0, 1] > 0.8
  # Fewer channels than 3: as many as there are.
  assert visualize.head_maps(features[..., :2], image_size).channels.shape == (k, b, 2)


def test_mistakes_are_one_line_and_write_nothing(two_heads, tmp_path, capsys):
  workdir = two_heads
  before = snapshot(workdir)
  out = str(tmp_path / "x.png")
  missing = str(tmp_path / "no_such_run")
  cases = [
      (["--images", "0"], "--images 0", ">= 1"),
      (["--images", "400"], "--images 400", "valid: 1..360"),
      (["--step", "7"], "step 7", "checkpoints: 1, 2"),
      (["--step", "newest"], "'newest'", "latest, best"),
      (["--step", "best"], "no evaluation yet", "no best step"),
      (["--split", "validation"], "'validation'", "available splits"),
      (["--images", "two"], "--images: invalid int value: 'two'", "usage:"),
  ]
  for extra, bad, valid in cases:
    assert visualize.main(["--workdir", workdir, "--out", out] + extra) == 1, extra
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, extra
    assert captured.err.startswith("featdiv_jax: error: ")
    assert bad in captured.err and valid in captured.err, captured.err
  assert visualize.main(["--workdir", missing, "--out", out]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"{missing} does not exist" in err
  assert visualize.main(["--workdir", workdir, "--out", str(tmp_path / "x.jpg")]) == 1
  assert "expected a .png file" in capsys.readouterr().err
  assert os.listdir(tmp_path) == [] and snapshot(workdir) == before
