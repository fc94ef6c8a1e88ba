"""dataset.train_crop="random_resized": torchvision's RandomResizedCrop, stateless per example, in
the per-image and per-batch pipelines, with and without the cache, across resume."""

import math
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from featdiv_jax import configlib, data
from featdiv_jax.data import preprocess
from featdiv_jax.data.preprocess import Preprocess, boxes_from_draws, random_resized_boxes


def make_config(**overrides):
  """A data config as saved before crop_scale / crop_ratio existed (unless overridden)."""
  fields = dict(name="digits", data_dir=None, train_split="test", eval_split="test",
                download=False, image_size=16, resize_size=0, pad=0, flip=True,
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), shuffle_buffer=500,
                train_crop="random_resized")
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
  """24 random JPEGs of mixed sizes and aspects in train/ (3 classes) and 3 in test/."""
  root = tmp_path_factory.mktemp("jpegs")
  rng = np.random.default_rng(0)
  for split, n in (("train", 24), ("test", 3)):
    for i in range(n):
      os.makedirs(root / split / f"c{i % 3}", exist_ok=True)
      shape = (int(rng.integers(10, 30)), int(rng.integers(10, 30)), 3)
      tf.io.write_file(str(root / split / f"c{i % 3}" / f"{i}.jpg"),
                       tf.io.encode_jpeg(tf.constant(rng.integers(0, 256, shape, np.uint8))))
  return str(root)


def config_for(kind, digits_dir, jpeg_folder, **overrides):
  """digits: 360 8x8 images of one size (augmented per batch); jpegs: 24 images of mixed sizes
  (augmented per image), resized to 12 first."""
  if kind == "digits":
    return make_config(data_dir=digits_dir, **overrides)
  return make_config(**{**dict(name="imagefolder", data_dir=jpeg_folder, train_split="train",
                               resize_size=12, image_size=10, shuffle_buffer=7), **overrides})


def stream(cfg, batch, start=0, seed=3):
  return data.train_batches(cfg, global_batch_size=batch, seed=seed, start_step=start,
                            process_index=0, process_count=1)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], b["label"])


# --- the pipeline -------------------------------------------------------------------------


@pytest.mark.parametrize("kind,batch", [("digits", 120), ("jpegs", 8)])  # 3 steps per epoch
def test_batches_are_deterministic_cache_independent_and_resumable(digits_dir, jpeg_folder,
                                                                   kind, batch):
  cfg = lambda cache: config_for(kind, digits_dir, jpeg_folder, cache=cache)
  size = cfg("none").image_size
  plain = take(stream(cfg("none"), batch), 7)  # 2+ epochs
  for b in plain:
    assert b["image"].shape == (batch, size, size, 3) and b["image"].dtype == np.uint8
  for a, b in zip(plain, take(stream(cfg("none"), batch), 2)):
    assert_same(a, b)
  for a, b in zip(plain, take(stream(cfg("memory"), batch), 7)):
    assert_same(a, b)
  for cache, k in (("memory", 4), ("none", 6)):  # in the second and third epochs
    assert_same(next(stream(cfg(cache), batch, start=k)), plain[k])


def test_each_example_and_epoch_gets_its_own_crop(digits_dir):
  # shuffle_buffer 1: every epoch of the 360 images in the same order, 3 batches of 120.
  cfg = config_for("digits", digits_dir, None, shuffle_buffer=1, flip=False)
  first, _, _, second = take(stream(cfg, 120), 4)
  np.testing.assert_array_equal(first["label"], second["label"])
  changed = [not np.array_equal(a, b) for a, b in zip(first["image"], second["image"])]
  assert sum(changed) > 100
  # Another crop than `random` of the same examples (the order does not depend on the crop).
  random = next(stream(config_for("digits", digits_dir, None, shuffle_buffer=1, flip=False,
                                  train_crop="random"), 120))
  np.testing.assert_array_equal(random["label"], first["label"])
  assert sum(not np.array_equal(a, b) for a, b in zip(random["image"], first["image"])) > 100
  # Copies of one image in a batch are cropped differently.
  copies = np.repeat(first["image"][:1], 32, axis=0)
  prep = Preprocess.from_config(cfg)
  out = prep.augment_batch(tf.constant(copies), tf.constant([3, 0], tf.int64)).numpy()
  assert len({im.tobytes() for im in out}) > 25


def test_pad_is_applied_before_the_crop_in_both_paths():
  # Area fraction 1 and aspect 1 on a square image: the box is the whole padded image.
  image = np.random.default_rng(1).integers(0, 256, (10, 10, 3), np.uint8)
  prep = Preprocess(image_size=8, pad=2, train_crop="random_resized", crop_scale=(1.0, 1.0),
                    crop_ratio=(1.0, 1.0))
  padded = tf.constant(np.pad(image, ((2, 2), (2, 2), (0, 0))), tf.float32)
  want = preprocess.to_uint8(tf.image.resize(padded, [8, 8], antialias=True)).numpy()
  seed = tf.constant([0, 1], tf.int64)
  np.testing.assert_array_equal(prep.augment(tf.constant(image), seed).numpy(), want)
  for out in prep.augment_batch(tf.constant(np.stack([image] * 3)), seed).numpy():
    np.testing.assert_array_equal(out, want)
  assert prep.static_decoded_shape((4, 4, 3)) == (4, 4)  # no upscale first: batched
  assert Preprocess(image_size=8).static_decoded_shape((4, 4, 3)) is None


@pytest.mark.parametrize("batched", [False, True])
def test_the_output_is_the_sampled_box_resized_and_flipped(batched):
  images = np.random.default_rng(2).integers(0, 256, (6, 20, 30, 3), np.uint8)
  prep = Preprocess(image_size=12, train_crop="random_resized", flip=True)
  seed = tf.constant([7, 11], tf.int64)
  if batched:
    outs = prep.augment_batch(tf.constant(images), seed).numpy()
    boxes = random_resized_boxes(20, 30, tf.random.experimental.stateless_fold_in(seed, 1), 6,
                                 prep.crop_scale, prep.crop_ratio)
  else:
    seeds = [tf.constant([7, i], tf.int64) for i in range(6)]
    outs = [prep.augment(tf.constant(im), s).numpy() for im, s in zip(images, seeds)]
    boxes = [tf.concat(parts, 0) for parts in zip(*(
        random_resized_boxes(20, 30, tf.random.experimental.stateless_split(s, 2)[0], 1,
                             prep.crop_scale, prep.crop_ratio) for s in seeds))]
  flips = 0
  for image, out, (top, left, h, w) in zip(images, outs, zip(*(b.numpy() for b in boxes))):
    crop = tf.constant(image[top:top + h, left:left + w], tf.float32)
    want = preprocess.to_uint8(tf.image.resize(crop, [12, 12], antialias=bool(h > 12 or w > 12)))
    flipped = not np.array_equal(out, want.numpy())
    if flipped:
      np.testing.assert_array_equal(out, want.numpy()[:, ::-1])
    flips += flipped
  assert 0 < flips < 6


# --- the box sampler ------------------------------------------------------------------------


def torchvision_get_params(height, width, fractions, log_ratios, offsets, ratio):
  """torchvision.transforms.RandomResizedCrop.get_params (0.20), its random draws given."""
  area = height * width
  for fraction, log_ratio in zip(fractions, log_ratios):
    target_area = area * fraction
    aspect_ratio = math.exp(log_ratio)
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      return offsets[0] % (height - h + 1), offsets[1] % (width - w + 1), h, w
  in_ratio = float(width) / float(height)
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w = width
    h = height
  return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height,width,scale,ratio", [
    (20, 30, (0.08, 1.0), (3 / 4, 4 / 3)),
    (31, 17, (0.3, 1.0), (0.2, 5.0)),      # many attempts too tall or too wide
    (12, 40, (0.9, 1.0), (0.5, 2.0)),      # the fallback too: at most 2:1, the image is 10:3
    (40, 12, (0.9, 1.0), (0.5, 2.0)),
])
def test_boxes_are_torchvisions_given_the_same_draws(height, width, scale, ratio):
  rng = np.random.default_rng(3)
  count = 400
  fractions = rng.uniform(*scale, (count, preprocess.RESIZED_CROP_ATTEMPTS))
  log_ratios = rng.uniform(*np.log(ratio), (count, preprocess.RESIZED_CROP_ATTEMPTS))
  offsets = rng.integers(0, 1 << 62, (2, count))
  got = np.stack([b.numpy() for b in boxes_from_draws(
      height, width, tf.constant(fractions), tf.constant(log_ratios), tf.constant(offsets),
      ratio)], axis=1)
  want = [torchvision_get_params(height, width, f, r, o, ratio)
          for f, r, o in zip(fractions, log_ratios, offsets.T)]
  np.testing.assert_array_equal(got, want)


def test_sampled_boxes_lie_in_the_scale_and_ratio_ranges():
  height, width, scale, ratio = 800, 800, (0.08, 1.0), (3 / 4, 4 / 3)
  boxes = [np.stack([b.numpy() for b in random_resized_boxes(
      height, width, tf.constant([s, 9], tf.int64), 64, scale, ratio)], axis=1)
      for s in range(32)]
  top, left, h, w = np.concatenate(boxes).T
  assert len(np.unique(np.concatenate(boxes), axis=0)) == 32 * 64  # every seed its own boxes
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  fraction, aspect = h * w / (height * width), w / h
  # Sides of 190+ pixels, rounded: within 0.6% of the drawn area fraction and aspect ratio.
  assert fraction.min() >= scale[0] * 0.994 and fraction.max() <= scale[1]
  assert aspect.min() >= ratio[0] * 0.994 and aspect.max() <= ratio[1] * 1.006
  # Spread over the ranges (large boxes fit only near aspect 1), log-uniform aspects symmetric
  # about 1 on a square image (a uniform log draw puts 22% below 0.85 and 22% above 1 / 0.85),
  # positions over the free space.
  assert fraction.min() < 0.1 and fraction.max() > 0.9
  assert np.histogram(fraction, bins=10, range=(0, 1))[0][1:8].min() > 150
  assert abs(np.mean(np.log(aspect))) < 0.03
  for tail in (aspect < 0.85, aspect > 1 / 0.85):
    assert 0.15 < np.mean(tail) < 0.26
  for edge in (top == 0, left == 0, top + h == height, left + w == width):
    assert edge.sum() > 5


@pytest.mark.parametrize("height,width,scale,ratio,box", [
    (100, 100, (0.5, 1.0), (10.0, 10.0), (45, 0, 10, 100)),   # too wide to fit: a central band
    (100, 100, (0.5, 1.0), (0.1, 0.1), (0, 45, 100, 10)),     # too tall
    (100, 300, (1.0, 1.0), (2.0, 2.9), (0, 5, 100, 290)),     # wider than the ratio allows
    (100, 300, (1.1, 1.2), (2.0, 4.0), (0, 0, 100, 300)),     # area > 1 (refused by the config)
    (3, 1, (0.5, 1.0), (10.0, 10.0), (1, 0, 1, 1)),           # torchvision's empty box: 1 pixel
])
def test_the_fallback_is_the_central_crop_clamped_to_the_ratio(height, width, scale, ratio, box):
  for s in range(3):
    got = random_resized_boxes(height, width, tf.constant([s, 1], tf.int64), 5, scale, ratio)
    np.testing.assert_array_equal(np.stack([b.numpy() for b in got], axis=1), [box] * 5)


# --- configs --------------------------------------------------------------------------------


def test_a_config_saved_before_the_fields_gets_the_defaults():
  prep = Preprocess.from_config(make_config())
  assert prep.train_crop == "random_resized"
  assert prep.crop_scale == (0.08, 1.0) and prep.crop_ratio == (3 / 4, 4 / 3)
  prep = Preprocess.from_config(make_config(crop_scale=[0.25, 0.5], crop_ratio=(1, 2)))
  assert prep.crop_scale == (0.25, 0.5) and prep.crop_ratio == (1.0, 2.0)
  default = configlib.default_config().dataset
  assert Preprocess.from_config(default).crop_ratio == tuple(default.crop_ratio)


@pytest.mark.parametrize("field,value", [("crop_scale", (0.5, 1.5)), ("crop_scale", (0.5,)),
                                         ("crop_ratio", (2.0, 1.0)), ("crop_ratio", (0, 1)),
                                         ("crop_ratio", "wide")])
def test_bad_ranges_name_the_field(field, value):
  with pytest.raises(data.DatasetError, match=rf"dataset\.{field} must be two numbers"):
    Preprocess.from_config(make_config(**{field: value}))
