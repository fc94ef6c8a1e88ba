"""The input pipelines: digits offline, determinism and resume, per-process sharding, mocked TFDS
data sets, preprocessing, image folders and the errors users see. No network, no downloads."""

import collections
import os
import time

import ml_collections
import numpy as np
import pytest
import requests
from sklearn.datasets import load_digits
import tensorflow as tf
import tensorflow_datasets as tfds

import jax

from featdiv_jax import data, steps
from featdiv_jax.data import digits as digits_lib
from featdiv_jax.data import pipeline
from featdiv_jax.data import sources
from featdiv_jax.data.preprocess import Preprocess, at_least, decode, resize_shorter_side
from featdiv_jax.data.preprocess import to_grayscale


def make_config(**overrides):
  fields = dict(name="digits", data_dir=None, train_split="train", eval_split="test",
                download=False, image_size=32, resize_size=32, pad=4, flip=True,
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), shuffle_buffer=2000)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def dc(digits_dir):
  return make_config(data_dir=digits_dir)


@pytest.fixture(scope="module")
def raw_dc(digits_dir):
  """Digits as stored: 8x8, no augmentation (so examples can be identified)."""
  return make_config(data_dir=digits_dir, image_size=8, resize_size=0, pad=0, flip=False,
                     mean=(0, 0, 0), std=(1, 1, 1))


def ids(batches):
  """Multiset of (label, image bytes) of the real (mask=True) examples."""
  out = collections.Counter()
  for b in batches:
    mask = b.get("mask", np.ones(len(b["label"]), bool))
    out.update((int(l), np.asarray(im, np.uint8).tobytes())
               for im, l in zip(b["image"][mask], b["label"][mask]))
  return out


def take(it, n):
  return [next(it) for _ in range(n)]


def test_tensorflow_sees_no_gpu():
  assert tf.config.get_visible_devices("GPU") == []


# --- digits -------------------------------------------------------------------------------


def test_digits_prepares_offline_with_split_sizes(dc, digits_dir):
  start = time.time()
  info = data.dataset_info(dc)
  assert info == data.DatasetInfo(num_classes=10, train_size=1437, eval_size=360)
  assert os.path.isdir(os.path.join(digits_dir, "sklearn_digits", "1.0.0"))
  assert time.time() - start < 30


def test_digits_eval_holds_sklearns_test_images(raw_dc):
  n, make = data.eval_batches(raw_dc, global_batch_size=100, process_index=0, process_count=1)
  batches = list(make())
  assert n == len(batches) == 4
  digits = load_digits()
  pixels = digits_lib.to_uint8(digits.images)
  rgb = np.repeat(pixels[..., None], 3, axis=-1)  # grayscale replicated to 3 channels
  test = digits_lib.split_indices()["test"]
  expected = collections.Counter((int(digits.target[i]), rgb[i].tobytes()) for i in test)
  assert ids(batches) == expected


def test_digits_train_batches_are_uint8_real_images(dc):
  batch = next(data.train_batches(dc, global_batch_size=64, seed=0))  # jax's one process
  assert batch["image"].shape == (64, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
  assert batch["label"].min() >= 0 and batch["label"].max() < 10
  assert len(np.unique(batch["label"])) > 3
  # every image has ink and background
  per_image_std = batch["image"].reshape(64, -1).std(axis=1)
  assert (per_image_std > 25).all()
  # the steps' normalisation (mean 0.5, std 0.5): black -> -1, white -> +1
  x = np.asarray(steps.normalize_images(batch["image"], dc.mean, dc.std))
  assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1 and x.min() < -0.9


# --- determinism and resume ---------------------------------------------------------------


def test_same_seed_same_stream_other_seed_differs(dc):
  a = take(data.train_batches(dc, global_batch_size=64, seed=3, process_count=1,
                              process_index=0), 2)
  b = take(data.train_batches(dc, global_batch_size=64, seed=3, process_count=1,
                              process_index=0), 2)
  c = next(data.train_batches(dc, global_batch_size=64, seed=4, process_count=1,
                              process_index=0))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(a[0]["image"], c["image"])


def test_resume_equals_uninterrupted_stream(dc):
  # 1,437 / 64 is 22.5 steps per epoch: step 30 lies in the second epoch.
  stream = take(data.train_batches(dc, global_batch_size=64, seed=7, process_count=1,
                                   process_index=0), 31)
  for k in (1, 22, 30):
    resumed = next(data.train_batches(dc, global_batch_size=64, seed=7, start_step=k,
                                      process_count=1, process_index=0))
    np.testing.assert_array_equal(resumed["image"], stream[k]["image"])
    np.testing.assert_array_equal(resumed["label"], stream[k]["label"])


# --- processes ----------------------------------------------------------------------------


def test_two_processes_get_disjoint_halves(raw_dc):
  # 718 examples per process: 22 local batches of 32 stay inside the first epoch.
  streams = [take(data.train_batches(raw_dc, global_batch_size=64, seed=0, process_index=p,
                                     process_count=2), 22) for p in (0, 1)]
  assert streams[0][0]["image"].shape == (32, 8, 8, 3)
  seen = [ids(s) for s in streams]
  assert all(max(s.values()) == 1 and sum(s.values()) == 704 for s in seen)  # no repeats
  assert not set(seen[0]) & set(seen[1])


@pytest.mark.parametrize("count", [1, 2, 3])
def test_eval_covers_every_example_once(raw_dc, count):
  gbs = 24 * count
  results = [data.eval_batches(raw_dc, global_batch_size=gbs, process_index=p,
                               process_count=count) for p in range(count)]
  assert len({n for n, _ in results}) == 1
  first, again = list(results[-1][1]()), list(results[-1][1]())
  for a, b in zip(first, again):  # the order is deterministic
    np.testing.assert_array_equal(a["image"], b["image"])
  covered = collections.Counter()
  for n, make in results:
    batches = list(make())
    assert len(batches) == n
    for b in batches:
      assert b["image"].shape == (24, 8, 8, 3) and b["mask"].shape == (24,)
      assert b["mask"].dtype == np.bool_
      assert not b["image"][~b["mask"]].any()  # padding is zeros
    covered += ids(batches)
  assert sum(covered.values()) == 360 and max(covered.values()) == 1


@pytest.mark.parametrize("count", [1, 2])
def test_probe_examples_are_an_even_unaugmented_subset_of_train(raw_dc, count):
  """side='train' with max_examples: every ceil(1437 / 100) = 15th stored training example of
  each process's part, preprocessed as for evaluation, each once."""
  results = [data.eval_batches(raw_dc, global_batch_size=16 * count, process_index=p,
                               process_count=count, side="train", max_examples=100)
             for p in range(count)]
  got = collections.Counter()
  for n, make in results:
    batches = list(make())
    assert len(batches) == n
    got += ids(batches)
  whole = ids(data.eval_batches(raw_dc, global_batch_size=1437, side="train",
                                process_index=0, process_count=1)[1]())
  assert sum(whole.values()) == 1437
  assert 90 <= sum(got.values()) <= 100 and not got - whole   # real training images, no noise
  labels = [label for label, _ in got.elements()]
  assert set(labels) == set(range(10))   # spread over the split: every class is there
  if count == 1:
    everything = list(data.eval_batches(raw_dc, global_batch_size=1437, side="train",
                                        process_index=0, process_count=1)[1]())[0]
    strided = list(results[0][1]())
    images = np.concatenate([b["image"][b["mask"]] for b in strided])
    np.testing.assert_array_equal(images, everything["image"][::15])
  with pytest.raises(data.DatasetError, match="side 'validation'; valid: train, eval"):
    data.eval_batches(raw_dc, global_batch_size=8, side="validation")


# --- TFDS data sets under tfds.testing.mock_data -------------------------------------------


@pytest.mark.parametrize("name,resize,split", [("cifar10", 0, "test"),
                                               ("caltech101", 40, "test"),
                                               ("oxford_flowers102", 40, "validation")])
def test_mocked_tfds_datasets(name, resize, split):
  cfg = make_config(name=name, resize_size=resize, eval_split=split, shuffle_buffer=16)
  with tfds.testing.mock_data(num_examples=10):
    info = data.dataset_info(cfg)
    assert info.train_size == info.eval_size == 10
    assert info.num_classes == (10 if name == "cifar10" else 102)
    batches = take(data.train_batches(cfg, global_batch_size=4, seed=0, process_index=0,
                                      process_count=1), 4)  # wraps past the 10 examples
    for b in batches:
      assert b["image"].shape == (4, 32, 32, 3) and b["label"].max() < info.num_classes
    for count in (1, 3):  # 3 parts of 10 examples: 4, 3, 3
      covered = collections.Counter()
      for p in range(count):
        n, make = data.eval_batches(cfg, global_batch_size=4 * count, process_index=p,
                                    process_count=count)
        got = list(make())
        assert len(got) == n == (3 if count == 1 else 1)
        covered += ids(got)
      assert sum(covered.values()) == 10 and max(covered.values()) == 1


# --- preprocessing ------------------------------------------------------------------------


def png(array):
  return tf.io.encode_png(tf.constant(array, tf.uint8))


def test_pad_and_crop_keep_size_and_shift_the_image():
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
  prep = Preprocess(image_size=32, pad=4)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  offsets = set()
  for s in range(12):
    out = prep.train(png(image), tf.constant([0, s], tf.int64)).numpy()
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    hits = [(y, x) for y in range(9) for x in range(9)
            if np.array_equal(out, padded[y:y + 32, x:x + 32])]
    assert len(hits) == 1
    offsets.add(hits[0])
  assert len(offsets) > 3  # the crop position is random


@pytest.mark.parametrize("train_crop", ["random", "center"])
def test_a_batch_is_augmented_per_image_like_one_image_is(train_crop):
  # augment_batch (images of one size): each image padded, cropped at its own offset, flipped by
  # its own coin; the offsets and coins vary over the batch and with the seed.
  images = np.random.default_rng(0).integers(0, 256, (16, 10, 12, 3), np.uint8)
  prep = Preprocess(image_size=8, pad=2, flip=True, train_crop=train_crop)
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  placements = set()
  for s in range(3):
    out = prep.augment_batch(tf.constant(images), tf.constant([4, s], tf.int64)).numpy()
    assert out.shape == (16, 8, 8, 3) and out.dtype == np.uint8
    for b in range(16):
      hits = [(y, x, flip) for y in range(7) for x in range(9) for flip in (0, 1)
              if np.array_equal(out[b], padded[b, y:y + 8, x:x + 8][:, ::-1 if flip else 1])]
      assert hits, "not a (flipped) crop of its own padded image"
      placements.add(hits[0])
  if train_crop == "center":  # center_crop's offsets in the padded (14, 16) image, only flipped
    assert {(y, x) for y, x, _ in placements} == {(3, 4)}
  else:
    assert len({(y, x) for y, x, _ in placements}) > 10
  assert {flip for _, _, flip in placements} == {0, 1}


def test_the_static_decoded_shape_is_what_decoding_gives():
  prep = Preprocess(image_size=8, resize_size=10)
  image = np.zeros((13, 17, 3), np.uint8)
  assert prep.static_decoded_shape((13, 17, 3)) == tuple(prep.decoded(png(image)).shape[:2])
  assert prep.static_decoded_shape((None, None, 3)) is None and prep.static_decoded_shape(None) is None
  assert Preprocess(image_size=32, pad=4).static_decoded_shape((32, 32, 3)) == (32, 32)
  assert Preprocess(image_size=32, pad=1).static_decoded_shape((28, 28, 3)) is None  # upscaled


def test_flip_mirrors_some_examples_and_only_that():
  image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), np.uint8)
  plain, flipping = Preprocess(image_size=12), Preprocess(image_size=12, flip=True)
  flipped = 0
  for s in range(16):
    key = tf.constant([5, s], tf.int64)
    a, b = plain.train(png(image), key).numpy(), flipping.train(png(image), key).numpy()
    if not np.array_equal(a, b):
      np.testing.assert_array_equal(b, a[:, ::-1])
      flipped += 1
  assert 0 < flipped < 16


def test_eval_center_crop_and_normalisation_on_the_device():
  image = np.random.default_rng(2).integers(0, 256, (10, 13, 3), np.uint8)
  prep = Preprocess(image_size=8, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
  out = prep.eval(png(image)).numpy()
  np.testing.assert_array_equal(out, image[1:9, 2:10])  # uint8 pixels, exactly
  want = (image[1:9, 2:10] / 255 - np.array([0.1, 0.2, 0.3])) / np.array([0.5, 0.25, 2.0])
  normalised = jax.jit(steps.normalize_images, static_argnums=(1, 2))(out, prep.mean, prep.std)
  np.testing.assert_allclose(normalised, want, atol=1e-6)
  floats = np.zeros((2, 2, 3), np.float32)  # model inputs already: passed through
  assert steps.normalize_images(floats, prep.mean, prep.std) is floats


def test_resized_images_are_rounded_to_the_nearest_pixel_level():
  image = np.random.default_rng(3).integers(0, 256, (10, 13, 3), np.uint8)
  prep = Preprocess(image_size=8, resize_size=9)
  resized = resize_shorter_side(tf.constant(image, tf.float32), 9).numpy()
  want = np.clip(np.round(resized), 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(prep.decoded(png(image)).numpy(), want)
  assert np.abs(want - resized).max() <= 0.5


def test_resize_shorter_side_and_upscale_to_fit():
  shape = lambda x: tuple(x.shape.as_list())
  assert shape(resize_shorter_side(tf.zeros([8, 8, 3]), 32)) == (32, 32, 3)
  assert shape(resize_shorter_side(tf.zeros([300, 200, 3]), 256)) == (384, 256, 3)
  assert shape(resize_shorter_side(tf.zeros([200, 333, 3]), 256)) == (256, 426, 3)
  assert shape(at_least(tf.zeros([5, 7, 3]), 8)) == (8, 12, 3)
  assert shape(at_least(tf.zeros([9, 7, 3]), 4)) == (9, 7, 3)
  # Smaller than the crop even after resizing: upscaled, not a crash.
  prep = Preprocess(image_size=16, resize_size=10, pad=1)
  assert prep.train(png(np.zeros((6, 9, 3))), tf.constant([0, 0], tf.int64)).shape == (16, 16, 3)
  assert prep.eval(png(np.zeros((6, 9, 3)))).shape == (16, 16, 3)


# --- image folders ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  write = lambda path, array: tf.io.write_file(str(path), png(array))
  colour = lambda c, shape, ch=3: np.broadcast_to(np.array(c, np.uint8)[:ch], shape + (ch,))
  for split, n in (("train", 3), ("val", 2)):
    for cls, rgb in (("b_blue", (0, 0, 200, 255)), ("a_red", (200, 0, 0, 255))):
      os.makedirs(root / split / cls)
      for i in range(n):
        write(root / split / cls / f"{i}.png", colour(rgb, (9 + i, 11)))
  # A grayscale and an RGBA file, and a non-image that must be ignored.
  write(root / "train" / "a_red" / "gray.png", np.full((10, 10, 1), 77, np.uint8))
  write(root / "train" / "b_blue" / "rgba.png", colour((0, 0, 200, 10), (12, 10), 4))
  (root / "train" / "a_red" / "notes.txt").write_text("not an image")
  return str(root)


def test_imagefolder_reads_grayscale_rgba_and_sorts_classes(folder):
  cfg = make_config(name="imagefolder", data_dir=folder, eval_split="val", image_size=8,
                    resize_size=0, pad=0, flip=False, mean=(0, 0, 0), std=(1, 1, 1))
  assert data.dataset_info(cfg) == data.DatasetInfo(num_classes=2, train_size=8, eval_size=4)
  n, make = data.eval_batches(cfg, global_batch_size=4, process_index=0, process_count=1)
  (batch,) = list(make())
  assert n == 1 and batch["mask"].all()
  red = batch["image"][..., 0].mean(axis=(1, 2)) > 127
  np.testing.assert_array_equal(red, batch["label"] == 0)  # a_red sorts first
  train = next(data.train_batches(cfg, global_batch_size=8, seed=0, process_index=0,
                                  process_count=1))
  assert train["image"].shape == (8, 8, 8, 3)
  pixels = {tuple(int(v) for v in im[0, 0]) for im in train["image"]}
  assert pixels == {(200, 0, 0), (0, 0, 200), (77, 77, 77)}
  assert sorted(train["label"]) == [0] * 4 + [1] * 4


# --- errors -------------------------------------------------------------------------------


def test_unknown_dataset_lists_the_valid_ones():
  with pytest.raises(data.DatasetError, match="'mnist'.*digits, cifar10"):
    data.dataset_info(make_config(name="mnist"))


def test_unknown_split_lists_the_available_ones(dc):
  with pytest.raises(data.DatasetError, match="'validation'.*train, test"):
    data.dataset_info(make_config(data_dir=dc.data_dir, eval_split="validation"))


def test_not_prepared_without_download_fails_fast(tmp_path):
  start = time.time()
  with pytest.raises(data.DatasetError, match=r"not prepared.*tfds build cifar10"):
    data.train_batches(make_config(name="cifar10", data_dir=str(tmp_path)),
                       global_batch_size=8, seed=0, process_index=0, process_count=1)
  assert time.time() - start < 10
  assert not os.listdir(tmp_path)  # nothing written, nothing downloaded


def test_download_failure_becomes_a_dataset_error(tmp_path, monkeypatch):
  def offline(self, **kwargs):
    raise requests.exceptions.ConnectionError("no route to host")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
  with pytest.raises(data.DatasetError, match=r"could not download.*no route.*tfds build"):
    data.dataset_info(make_config(name="cifar10", data_dir=str(tmp_path), download=True))


def test_batch_not_divisible_by_processes(dc):
  with pytest.raises(data.DatasetError, match="63.*process_count 2"):
    data.train_batches(dc, global_batch_size=63, seed=0, process_index=0, process_count=2)
  with pytest.raises(data.DatasetError, match="63.*process_count 2"):
    data.eval_batches(dc, global_batch_size=63, process_index=1, process_count=2)


@pytest.mark.parametrize("field,value,match", [("image_size", 0, "image_size"),
                                                ("mean", (0.5, 0.5), "mean"),
                                                ("std", (0.5, 0.0, 0.5), "std")])
def test_bad_preprocessing_values(dc, field, value, match):
  with pytest.raises(data.DatasetError, match=match):
    data.eval_batches(make_config(data_dir=dc.data_dir, **{field: value}), global_batch_size=8,
                      process_index=0, process_count=1)


def test_imagefolder_missing_folders(folder, tmp_path):
  with pytest.raises(data.DatasetError, match="does not exist"):
    data.dataset_info(make_config(name="imagefolder", data_dir=str(tmp_path / "nope")))
  with pytest.raises(data.DatasetError, match=r"'test'.*splits found.*train, val"):
    data.dataset_info(make_config(name="imagefolder", data_dir=folder, eval_split="test"))


# --- bad files in image folders: one DatasetError naming the file, when the source opens ------


@pytest.fixture
def small_folder(tmp_path):
  """train/ and test/, one good PNG per class: each test adds the file that is wrong."""
  for split in ("train", "test"):
    for cls in ("a", "b"):
      os.makedirs(tmp_path / split / cls)
      tf.io.write_file(str(tmp_path / split / cls / "0.png"), png(np.zeros((9, 9, 3))))
  return tmp_path


def folder_config(root):
  return make_config(name="imagefolder", data_dir=str(root), image_size=8, resize_size=0)


@pytest.mark.parametrize("name,content,match", [
    ("x.jpg", b"not an image at all", r"x\.jpg' is not an image: a JPEG file starts with"),
    ("x.png", b"", r"x\.png' is not an image: a PNG file starts with .*this one with b''"),
    ("x.GIF", b"<html>", r"x\.GIF' is not an image: a GIF file"),
])
def test_a_non_image_with_an_image_name_is_refused_when_the_source_opens(small_folder, name,
                                                                         content, match):
  (small_folder / "test" / "b" / name).write_bytes(content)
  with pytest.raises(data.DatasetError, match=match) as e:
    data.dataset_info(folder_config(small_folder))
  assert str(small_folder / "test" / "b" / name) in str(e.value)
  assert "BMP/GIF/JPEG/PNG" in str(e.value)  # what would be valid


def test_the_image_check_reads_bytes_not_names(small_folder):
  # tf.io.decode_image goes by the bytes, so a PNG saved as .jpg trains fine: not refused.
  tf.io.write_file(str(small_folder / "train" / "a" / "really_a_png.jpg"), png(np.ones((9, 9, 3))))
  assert data.dataset_info(folder_config(small_folder)).train_size == 3


def test_an_unreadable_image_is_refused_when_the_source_opens(small_folder):
  bad = small_folder / "train" / "a" / "locked.png"
  tf.io.write_file(str(bad), png(np.zeros((9, 9, 3))))
  os.chmod(bad, 0)
  try:
    if os.access(bad, os.R_OK):
      pytest.skip("running as root: a chmod 000 file stays readable (see the simulated test)")
    with pytest.raises(data.DatasetError, match=r"locked\.png' cannot be read"):
      data.dataset_info(folder_config(small_folder))
  finally:
    os.chmod(bad, 0o644)  # so tmp_path can be cleaned up


def test_a_read_error_is_refused_when_the_source_opens_simulated(small_folder, monkeypatch):
  # The permission test above is skipped as root; this one makes the read fail instead.
  bad = str(small_folder / "train" / "b" / "0.png")
  real_gfile = tf.io.gfile.GFile

  def gfile(path, mode="r"):
    if path == bad:
      raise tf.errors.PermissionDeniedError(None, None, f"{path}; Permission denied")
    return real_gfile(path, mode)

  monkeypatch.setattr(tf.io.gfile, "GFile", gfile)
  with pytest.raises(data.DatasetError, match=r"b/0\.png' cannot be read: .*Permission denied"):
    data.dataset_info(folder_config(small_folder))


def test_a_remote_folder_is_checked_too(tmp_path):
  # TF's in-memory file system stands in for gs://: remote files are checked by a thread pool.
  root = f"ram://{tmp_path.name}"
  for split in ("train", "test"):
    for i, cls in enumerate(("a", "b")):
      tf.io.gfile.makedirs(f"{root}/{split}/{cls}")
      tf.io.write_file(f"{root}/{split}/{cls}/{i}.png", png(np.zeros((9, 9, 3))))
  assert data.dataset_info(folder_config(root)).train_size == 2
  with tf.io.gfile.GFile(f"{root}/test/a/x.jpeg", "w") as f:
    f.write("not a JPEG")
  with pytest.raises(data.DatasetError, match=rf"'{root}/test/a/x\.jpeg' is not an image"):
    data.dataset_info(folder_config(root))


def test_a_folder_named_like_an_image_is_refused(small_folder):
  os.makedirs(small_folder / "train" / "b" / "odd.png")
  with pytest.raises(data.DatasetError, match=r"odd\.png' cannot be read"):
    data.dataset_info(folder_config(small_folder))


def test_an_unknown_split_names_the_config_field(dc, small_folder):
  with pytest.raises(data.DatasetError, match=r"dataset\.eval_split='validation' is invalid"):
    data.dataset_info(make_config(data_dir=dc.data_dir, eval_split="validation"))
  with pytest.raises(data.DatasetError, match=r"dataset\.train_split='val' is invalid.*train"):
    data.dataset_info(make_config(name="imagefolder", data_dir=str(small_folder),
                                  train_split="val"))


def test_preparing_a_data_dir_another_process_just_prepared_is_not_an_error():
  from featdiv_jax.data import sources

  class Builder:
    def __init__(self, done):
      self.done = done

    def download_and_prepare(self, **kwargs):
      raise FileExistsError("Cannot rename incomplete.x: destination 1.0.0 already exists")

    def is_prepared(self):
      return self.done

  sources.prepare_once(Builder(done=True))  # the other process won the rename: fine
  with pytest.raises(FileExistsError):
    sources.prepare_once(Builder(done=False))  # a real failure still surfaces


def test_the_eval_split_is_decoded_once(small_folder):
  num_batches, make_iter = data.eval_batches(folder_config(small_folder), global_batch_size=2,
                                             process_index=0, process_count=1)
  first = list(make_iter())
  for image in (small_folder / "test").rglob("*.png"):
    image.unlink()  # a second evaluation that read the files would fail now
  second = list(make_iter())
  assert len(first) == len(second) == num_batches
  for a, b in zip(first, second):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_an_eval_split_too_large_for_memory_is_read_each_time(small_folder, monkeypatch):
  monkeypatch.setattr(pipeline, "CACHE_MAX_BYTES", 8 * 8 * 3 - 1)  # under one image
  _, make_iter = data.eval_batches(folder_config(small_folder), global_batch_size=2,
                                   process_index=0, process_count=1)
  list(make_iter())
  for image in (small_folder / "test").rglob("*.png"):
    image.unlink()
  with pytest.raises(tf.errors.NotFoundError):
    list(make_iter())


# --- dataset.cache: decoded images in memory --------------------------------------------------


@pytest.fixture
def jpeg_folder(tmp_path):
  """24 random JPEGs of mixed sizes and aspects in train/ (3 classes) and 4 in test/."""
  rng = np.random.default_rng(0)
  for split, n in (("train", 24), ("test", 4)):
    for i in range(n):
      os.makedirs(tmp_path / split / f"c{i % 3}", exist_ok=True)
      shape = (int(rng.integers(10, 20)), int(rng.integers(10, 20)), 3)
      tf.io.write_file(str(tmp_path / split / f"c{i % 3}" / f"{i}.jpg"),
                       tf.io.encode_jpeg(tf.constant(rng.integers(0, 256, shape, np.uint8))))
  return tmp_path


def jpeg_config(root, cache, **overrides):
  return make_config(**{**dict(name="imagefolder", data_dir=str(root), image_size=8,
                               resize_size=9, pad=1, flip=True, shuffle_buffer=7, cache=cache),
                        **overrides})


def delete_images(root):
  for image in root.rglob("*.jpg"):
    image.unlink()


@pytest.mark.parametrize("count,digits", [(1, False), (2, False), (1, True)])
def test_the_cache_changes_no_batch_over_epochs_and_resumes(jpeg_folder, dc, count, digits):
  # Mixed-size JPEGs (augmented per image), or the 360 digits test images (one size: augmented
  # per batch). 24 images, batch 10 over `count` processes: 2 (or 2.4) steps per epoch, 7 steps
  # = 3+ epochs; digits in batches of 120: 3 per epoch.
  def stream(cache, start):
    cfg = (make_config(**{**dc, "train_split": "test", "cache": cache}) if digits
           else jpeg_config(jpeg_folder, cache))
    return data.train_batches(cfg, global_batch_size=120 if digits else 10, seed=3,
                              start_step=start, process_index=count - 1, process_count=count)
  plain = take(stream("none", 0), 7)
  cached = take(stream("memory", 0), 7)
  for a, b in zip(plain, cached):
    assert b["image"].dtype == np.uint8
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(plain[0]["image"], plain[2]["image"])  # epochs are reshuffled
  for k in (3, 6):
    resumed = next(stream("memory", k))
    np.testing.assert_array_equal(resumed["image"], plain[k]["image"])


def test_a_cached_train_split_is_decoded_once(jpeg_folder):
  cached = data.train_batches(jpeg_config(jpeg_folder, "memory"), global_batch_size=8, seed=0,
                              process_index=0, process_count=1)
  plain = data.train_batches(jpeg_config(jpeg_folder, "none"), global_batch_size=8, seed=0,
                             process_index=0, process_count=1)
  next(plain)
  delete_images(jpeg_folder)  # every later epoch must come from memory
  take(cached, 9)  # three epochs
  with pytest.raises(tf.errors.NotFoundError):
    take(plain, 9)


@pytest.mark.parametrize("overrides,limit,cached", [
    (dict(), 24 * 9 * 9 * 2 * 3, True),       # resized: the estimate (2:1 aspect) fits
    (dict(), 24 * 9 * 9 * 2 * 3 - 1, False),  # ... one byte over the limit
    (dict(resize_size=0), 1 << 40, False),    # files of unknown size: not cached by auto
])
def test_auto_caches_what_it_can_size_under_the_limit(jpeg_folder, monkeypatch, overrides, limit,
                                                      cached):
  monkeypatch.setattr(pipeline, "CACHE_MAX_BYTES", limit)
  it = data.train_batches(jpeg_config(jpeg_folder, "auto", **overrides), global_batch_size=8,
                          seed=0, process_index=0, process_count=1)
  next(it)
  delete_images(jpeg_folder)
  if cached:
    take(it, 9)
  else:
    with pytest.raises(tf.errors.NotFoundError):
      take(it, 9)


def test_auto_caches_the_digits_and_a_config_without_the_field_reads_as_auto(dc):
  view = sources.open_view(dc)
  prep = Preprocess.from_config(dc)
  assert pipeline.cache_mode(dc) == "auto"  # make_config has no cache field
  assert pipeline.decoded_image_bytes(prep, view) * 1437 <= pipeline.CACHE_MAX_BYTES


def test_a_bad_cache_value_is_one_error_naming_it_and_the_valid_ones(jpeg_folder):
  with pytest.raises(data.DatasetError,
                     match=r"dataset\.cache must be one of auto, memory, none, got 'yes'"):
    data.train_batches(jpeg_config(jpeg_folder, "yes"), global_batch_size=8, seed=0,
                       process_index=0, process_count=1)


# --- the notebooks' recipe fields (issue 14): train_crop, grayscale, exclude_classes, holdout ---



# Pixels and their PIL `convert('L')` values (Pillow 13); TF's rgb_to_grayscale gives 149, 59, 22
# for the 2nd, 6th and 7th.
GRAY_PIXELS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (1, 1, 1), (200, 0, 0),
               (0, 0, 200), (10, 20, 30), (100, 150, 200), (37, 201, 99)]
GRAY_VALUES = [76, 150, 29, 255, 1, 60, 23, 18, 141, 140]


def test_center_train_crop_is_the_central_crop_of_the_resized_image():
  image = np.random.default_rng(3).integers(0, 256, (13, 17, 3), np.uint8)
  resized = resize_shorter_side(tf.constant(image, tf.float32), 10)  # (10, 13)
  want = np.round(tf.image.resize_with_crop_or_pad(resized, 8, 8).numpy()).astype(np.uint8)
  prep = Preprocess(image_size=8, resize_size=10, train_crop="center")
  outs = [prep.train(png(image), tf.constant([1, s], tf.int64)).numpy() for s in range(6)]
  for out in outs:  # deterministic: no seed moves it
    np.testing.assert_array_equal(out, want)
  np.testing.assert_array_equal(outs[0], prep.eval(png(image)).numpy())
  flipping = Preprocess(image_size=8, resize_size=10, train_crop="center", flip=True)
  flips = 0
  for s in range(12):
    out = flipping.train(png(image), tf.constant([1, s], tf.int64)).numpy()
    flipped = not np.array_equal(out, outs[0])
    if flipped:
      np.testing.assert_array_equal(out, outs[0][:, ::-1])
    flips += flipped
  assert 0 < flips < 12  # flips still apply


def test_grayscale_is_pils_convert_L_repeated_to_three_channels():
  pixels = np.array([GRAY_PIXELS], np.uint8)
  gray = to_grayscale(tf.constant(pixels)).numpy()
  np.testing.assert_array_equal(gray[0], np.repeat(np.array(GRAY_VALUES)[:, None], 3, axis=1))
  # The documented formula, L = R*299/1000 + G*587/1000 + B*114/1000, rounded.
  r, g, b = pixels[0].astype(np.float64).T
  np.testing.assert_array_equal(np.floor(r * .299 + g * .587 + b * .114 + .5), GRAY_VALUES)
  image = np.random.default_rng(4).integers(0, 256, (16, 16, 3), np.uint8)
  pil = pytest.importorskip("PIL.Image")
  want = np.asarray(pil.fromarray(image).convert("L"), np.uint8)
  np.testing.assert_array_equal(decode(png(image), grayscale=True).numpy(),
                                np.repeat(want[..., None], 3, axis=-1))
  # Before resizing and cropping, in train and eval alike.
  prep = Preprocess(image_size=16, grayscale=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
  for out in (prep.eval(png(image)).numpy(),
              prep.train(png(image), tf.constant([0, 0], tf.int64)).numpy()):
    np.testing.assert_array_equal(out[..., 0], want)
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def folder_raw(root, **overrides):
  return make_config(**{**dict(name="imagefolder", data_dir=root, eval_split="val", image_size=8,
                               resize_size=0, pad=0, flip=False, mean=(0, 0, 0), std=(1, 1, 1)),
                        **overrides})


def test_grayscale_in_the_pipeline(folder):
  cfg = folder_raw(folder, grayscale=True)
  (batch,) = list(data.eval_batches(cfg, global_batch_size=4, process_index=0,
                                    process_count=1)[1]())
  train = next(data.train_batches(cfg, global_batch_size=8, seed=0, process_index=0,
                                  process_count=1))
  for images in (batch["image"], train["image"]):
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
  # red (200, 0, 0) -> 60, blue (0, 0, 200) -> 23, gray 77 stays 77
  assert {int(v) for v in batch["image"][:, 0, 0, 0]} == {60, 23}
  assert {int(v) for v in train["image"][:, 0, 0, 0]} == {60, 23, 77}


def digits_examples(split, excluded=()):
  """Counter of (renumbered label, 8x8x3 uint8 bytes) of sklearn's digits in a split."""
  digits = load_digits()
  rgb = np.repeat(digits_lib.to_uint8(digits.images)[..., None], 3, axis=-1)
  kept = [c for c in range(10) if c not in excluded]
  indices = np.concatenate([digits_lib.split_indices()[s] for s in split.split("+")])
  return collections.Counter((kept.index(digits.target[i]), rgb[i].tobytes())
                             for i in indices if digits.target[i] in kept)


def eval_ids(cfg, count=1):
  out = collections.Counter()
  for p in range(count):
    out += ids(data.eval_batches(cfg, global_batch_size=60 * count, process_index=p,
                                 process_count=count)[1]())
  return out


def test_exclude_classes_drops_them_and_renumbers(raw_dc):
  cfg = make_config(**{**raw_dc, "exclude_classes": ("3", 5)})  # names or indices
  want_train, want_eval = digits_examples("train", (3, 5)), digits_examples("test", (3, 5))
  info = data.dataset_info(cfg)
  assert info == data.DatasetInfo(8, sum(want_train.values()), sum(want_eval.values()))
  assert eval_ids(cfg) == want_eval
  assert info.train_size % 228 == 0  # 1,140: one epoch in 5 batches
  train = take(data.train_batches(cfg, global_batch_size=228, seed=0, process_index=0,
                                  process_count=1), info.train_size // 228)
  assert ids(train) == want_train


def test_exclude_classes_of_an_image_folder(folder):
  cfg = folder_raw(folder, exclude_classes=("a_red",))
  assert data.dataset_info(cfg) == data.DatasetInfo(num_classes=1, train_size=4, eval_size=2)
  train = next(data.train_batches(cfg, global_batch_size=4, seed=0, process_index=0,
                                  process_count=1))
  assert (train["label"] == 0).all() and (train["image"][:, 0, 0, 2] > 127).all()  # blue


def test_holdout_splits_the_union_of_both_splits(raw_dc):
  cfg = make_config(**{**raw_dc, "holdout_fraction": 0.1, "holdout_seed": 1})
  everything = digits_examples("train+test")
  info = data.dataset_info(cfg)
  assert info == data.DatasetInfo(10, 1617, 180)  # round(0.1 x 1,797) = 180 held out
  held = eval_ids(cfg)
  assert sum(held.values()) == 180
  assert eval_ids(cfg, count=2) == held  # two processes: each example once, the same split
  train = take(data.train_batches(cfg, global_batch_size=231, seed=0, process_index=0,
                                   process_count=1), 7)  # 7 x 231 = 1,617: one epoch
  assert ids(train) + held == everything  # disjoint, and together the whole set
  halves = [ids(take(data.train_batches(cfg, global_batch_size=202, seed=0, process_index=p,
                                        process_count=2), 8)) for p in (0, 1)]
  assert sum(halves[0].values()) == sum(halves[1].values()) == 808  # 1,617 // 2 each
  assert halves[0] + halves[1] <= ids(train)  # no example twice
  other = eval_ids(make_config(**{**raw_dc, "holdout_fraction": 0.1, "holdout_seed": 2}))
  assert sum(other.values()) == 180 and other != held


def test_holdout_is_seeded_sized_and_disjoint():
  train, held = sources.holdout(8677, 0.1, 0)  # Caltech-101 without its background class
  assert len(held) == 868 and len(train) == 7809
  np.testing.assert_array_equal(np.sort(np.concatenate([train, held])), np.arange(8677))
  again, _ = sources.holdout(8677, 0.1, 0)
  np.testing.assert_array_equal(train, again)
  assert not np.array_equal(held, sources.holdout(8677, 0.1, 1)[1])
  assert len(sources.holdout(10, 0.25, -5)[1]) == 3  # round half up: 2.5 -> 3


def test_holdout_of_one_split_named_twice_counts_it_once(folder):
  cfg = folder_raw(folder, eval_split="train", holdout_fraction=0.25)
  assert data.dataset_info(cfg) == data.DatasetInfo(num_classes=2, train_size=6, eval_size=2)
  (held,) = list(data.eval_batches(cfg, global_batch_size=2, process_index=0,
                                   process_count=1)[1]())
  train = next(data.train_batches(cfg, global_batch_size=6, seed=0, process_index=0,
                                  process_count=1))
  assert ids([held]) + ids([train]) == ids(data.eval_batches(
      folder_raw(folder, eval_split="train"), global_batch_size=8, process_index=0,
      process_count=1)[1]())


def test_caltech_recipe_under_mocked_tfds():
  # The mock's labels (train and test alike) hold no background image: class 44 goes too.
  cfg = make_config(name="caltech101", resize_size=40, shuffle_buffer=16, grayscale=True,
                    train_crop="center", exclude_classes=("background_google", 44),
                    holdout_fraction=0.1)
  with tfds.testing.mock_data(num_examples=8):
    source = sources.open_source(cfg)
    assert source.class_names[4] == "background_google"
    kept = sum(int(np.isin(source.labels(s), (4, 44), invert=True).sum())
               for s in ("train", "test"))
    assert kept == 14
    info = data.dataset_info(cfg)
    assert info == data.DatasetInfo(num_classes=100, train_size=13, eval_size=1)  # round(1.4)
    batch = next(data.train_batches(cfg, global_batch_size=4, seed=0, process_index=0,
                                    process_count=1))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["label"].max() < 100
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 1])
    seen = 0
    for p in range(3):  # 1 held-out example over 3 processes: shares of 1, 0 and 0
      n, make = data.eval_batches(cfg, global_batch_size=3, process_index=p, process_count=3)
      seen += sum(int(b["mask"].sum()) for b in make())
    assert seen == 1


@pytest.mark.parametrize("overrides,count", [
    (dict(train_crop="center"), 1),
    (dict(grayscale=True), 1),  # digits are gray already: only resume is checked
    (dict(exclude_classes=(0, "7")), 1),
    (dict(holdout_fraction=0.2, holdout_seed=3), 2),
])
def test_resume_is_exact_with_the_recipe_fields(dc, overrides, count):
  # Trains on the 360 test images (holdout: 288 of them), so that epochs are short.
  base = make_config(**{**dc, "train_split": "test"})
  stream = lambda cfg, k: data.train_batches(cfg, global_batch_size=64, seed=5, start_step=k,
                                             process_index=count - 1, process_count=count)
  cfg = make_config(**{**base, **overrides})
  full = take(stream(cfg, 0), 8)  # 4.5 to 5.6 steps per epoch: steps 6 and 7 are in the second
  for k in (1, 6, 7):
    resumed = next(stream(cfg, k))
    np.testing.assert_array_equal(resumed["image"], full[k]["image"])
    np.testing.assert_array_equal(resumed["label"], full[k]["label"])
  if "grayscale" not in overrides:  # the field is in effect
    assert not np.array_equal(full[0]["image"], next(stream(base, 0))["image"])


@pytest.mark.parametrize("field,value,match", [
    ("train_crop", "middle", r"dataset\.train_crop.*random, center.*'middle'"),
    ("grayscale", "yes", r"dataset\.grayscale must be True or False, got 'yes'"),
    ("exclude_classes", ("nine",), r"dataset\.exclude_classes: 'nine' is not a class.*'0', '1'"),
    ("exclude_classes", (10,), r"dataset\.exclude_classes: 10 is not.*indices 0\.\.9"),
    ("exclude_classes", (True,), r"dataset\.exclude_classes: True is not"),
    ("exclude_classes", "3", r"dataset\.exclude_classes must be a tuple"),
    ("exclude_classes", tuple(range(10)), r"dataset\.exclude_classes=.*drops all 10 classes"),
    ("holdout_fraction", 1.0, r"dataset\.holdout_fraction must be a number in \[0, 1\)"),
    ("holdout_fraction", 0.0001, r"dataset\.holdout_fraction=0\.0001 holds out .* = 0 of"),
    ("holdout_seed", 0.5, r"dataset\.holdout_seed must be a 64-bit integer"),
])
def test_bad_recipe_values_name_the_field(dc, field, value, match):
  with pytest.raises(data.DatasetError, match=match):
    data.eval_batches(make_config(**{**dc, field: value}), global_batch_size=8,
                      process_index=0, process_count=1)


def test_a_misspelt_class_name_gets_a_suggestion():
  with tfds.testing.mock_data(num_examples=2):
    with pytest.raises(data.DatasetError, match=r"'BACKGROUND_Google' is not a class of "
                       r"'caltech101' \(did you mean 'background_google'\?\).*'accordion'"):
      data.dataset_info(make_config(name="caltech101", exclude_classes=("BACKGROUND_Google",)))
