"""featdiv_jax.predict on runs saved the training loop's way: each image file is preprocessed as
the eval pipeline does, bit for bit, the probabilities are the model's on those images, classes
carry the data set's names, and every mistake is one line, exit status 1, nothing on stdout."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

from featdiv_jax import data, predict, steps
from featdiv_jax.data import images, sources
from tests_util import ROOT, load_config, save_random_run

NUM_IMAGES = 8  # the smoke config's batch size: every run below compiles one program
CLASS_FOLDERS = ("ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "ibex", "jay")


@pytest.fixture(scope="module")
def digits_config(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  return load_config("digits", "multi_cos,smoke", **{"dataset.data_dir": data_dir})


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digits_config):
  """A multi_cos smoke run's workdir with checkpoints at steps 2 and 4 (random values in place
  of trained ones); (workdir, the state saved at step 4)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  return workdir, save_random_run(workdir, digits_config, [2, 4])


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory, digits_config):
  """The first NUM_IMAGES test-split digits as the PNG files TFDS stores (8x8 grayscale), five in
  a folder, the rest in a sub-folder, next to a text file; (folder, paths in listing order,
  the eval pipeline's uint8 batch of the same examples)."""
  folder = tmp_path_factory.mktemp("digits")
  os.makedirs(folder / "sub")
  (folder / "notes.txt").write_text("not an image")
  source = sources.open_source(digits_config.dataset)
  paths = []
  for i, example in enumerate(source.read_all("test").take(NUM_IMAGES).as_numpy_iterator()):
    path = folder / ("sub" if i >= 5 else "") / (f"{i}.PNG" if i == 4 else f"{i}.png")
    path.write_bytes(example["image"])
    paths.append(str(path))
  _, make_iter = data.eval_batches(digits_config.dataset, global_batch_size=NUM_IMAGES,
                                   process_index=0, process_count=1)
  return str(folder), paths, next(make_iter())["image"]


@pytest.fixture(scope="module")
def reference(digits_config, digits_run, digits_files):
  """The softmax of the run's logits (float64) on the eval pipeline's images of digits_files,
  normalised here in NumPy with the run's mean and std; and without that normalisation."""
  model = steps.build_model(digits_config.model, 10)
  state = digits_run[1]
  apply = jax.jit(model.apply, static_argnums=2)
  x = digits_files[2].astype(np.float32) / np.float32(255)
  mean, std = (np.asarray(v, np.float32)
               for v in (digits_config.dataset.mean, digits_config.dataset.std))

  def probabilities(x):
    logits, _ = apply({"params": state.params, "batch_stats": state.batch_stats}, x, False)
    logits = np.asarray(logits, np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  return probabilities((x - mean) / std), probabilities(x)


def test_images_are_the_eval_pipelines_bit_for_bit(digits_config, digits_files):
  _, paths, pipeline_images = digits_files
  batches = list(images.eval_image_batches(digits_config.dataset, paths, 3))
  assert [b.shape for b in batches] == [(3, 32, 32, 3)] * 3 and batches[0].dtype == np.uint8
  got = np.concatenate(batches)
  np.testing.assert_array_equal(got[:NUM_IMAGES], pipeline_images)
  assert not got[NUM_IMAGES:].any()  # the last batch's padding
  assert got[:NUM_IMAGES].std() > 10  # real digits, resized from 8x8


def test_predictions_are_the_models_on_the_eval_pipelines_images(digits_run, digits_files,
                                                                 reference, capsys):
  paths = digits_files[1]
  assert predict.main(["--workdir", digits_run[0], "--json", "--top", "99", *paths]) == 0
  out, err = capsys.readouterr()
  assert not err
  got = json.loads(out)
  assert [g["path"] for g in got] == paths
  want, unnormalised = reference
  for g, w in zip(got, want):
    classes = [t["class"] for t in g["top"]]
    probs = np.array([t["probability"] for t in g["top"]])
    assert sorted(classes) == list(range(10))  # --top 99: all ten classes
    assert [t["name"] for t in g["top"]] == [str(c) for c in classes]
    assert np.all(np.diff(probs) <= 0) and abs(probs.sum() - 1) < 1e-5
    np.testing.assert_allclose(probs, w[classes], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(w[classes], np.sort(w)[::-1], rtol=1e-5)  # top-1 first
  # The comparison tells preprocessings apart: without the normalisation it would fail.
  assert not np.allclose(unnormalised, want, rtol=1e-5, atol=1e-7)


LINE = re.compile(r"^  (\d\.\d{4})  (\S+) \((\d+)\)$")


def test_a_directory_is_all_its_images_at_any_depth_as_text(digits_run, digits_files,
                                                           reference, capsys):
  folder, paths, _ = digits_files
  assert predict.main(["--workdir", digits_run[0], "--top", "3", folder]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 4 * NUM_IMAGES
  assert lines[::4] == paths  # sorted, sub/ included, notes.txt left out
  for i, w in enumerate(reference[0]):
    rows = [LINE.match(line).groups() for line in lines[4 * i + 1:4 * i + 4]]
    probs = [float(p) for p, _, _ in rows]
    classes = [int(c) for _, _, c in rows]
    assert [name for _, name, _ in rows] == [str(c) for c in classes]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1
    np.testing.assert_allclose(probs, w[classes], rtol=0, atol=5.1e-5)  # printed to 4 places
    np.testing.assert_allclose(w[classes], np.sort(w)[::-1][:3], rtol=1e-5)  # the top 3


# --- class names ------------------------------------------------------------------------------


def write_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tf.io.write_file(str(path), tf.io.encode_png(tf.constant(array, tf.uint8)))


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
  """An image folder of ten classes, one small colour image each (train/), and an empty test/."""
  root = tmp_path_factory.mktemp("classes")
  rng = np.random.default_rng(0)
  for name in CLASS_FOLDERS:
    write_png(root / "train" / name / "0.png", rng.integers(0, 256, (12, 10, 3)))
  os.makedirs(root / "test")
  return str(root)


def folder_config(root, **overrides):
  return load_config("digits", "multi_cos,smoke", **{"dataset.name": "imagefolder",
                                                       "dataset.data_dir": root,
                                                       "dataset.eval_split": "train",
                                                       **overrides})


def test_class_names_of_an_image_folder_less_excluded_classes(class_folder, capsys):
  config = folder_config(class_folder, **{"dataset.exclude_classes": ("bee", 9)})
  assert predict.class_names(folder_config(class_folder).dataset, 10) == list(CLASS_FOLDERS)
  assert predict.class_names(config.dataset, 8) == [
      c for c in CLASS_FOLDERS if c not in ("bee", "jay")]
  assert not capsys.readouterr().err


@pytest.mark.parametrize("overrides,num_classes,why", [
    ({"dataset.name": "cifar10", "dataset.download": True}, 10,
     "dataset 'cifar10' is not prepared in data dir"),
    ({"dataset.data_dir": "{root}/gone"}, 10, "image folder root"),
    ({}, 3, "data set 'imagefolder' has 10 classes here, the run's classifier 3"),
])
def test_class_names_are_indices_with_one_warning_without_the_data(
    overrides, num_classes, why, class_folder, tmp_path, capsys):
  overrides = {k: v.format(root=tmp_path) if isinstance(v, str) else v
               for k, v in overrides.items()}
  config = folder_config(class_folder, **overrides)
  if config.dataset.name == "cifar10":
    config.dataset.data_dir = str(tmp_path)  # empty: nothing prepared, nothing downloaded
  assert predict.class_names(config.dataset, num_classes) == [str(i) for i in range(num_classes)]
  err = capsys.readouterr().err
  assert err.startswith("featdiv_jax: warning: classes are named by index: ")
  assert err.count("\n") == 1 and why in err, err
  assert not os.listdir(tmp_path)


def test_an_image_folder_runs_classes_are_its_folder_names(class_folder, tmp_path, capsys):
  workdir = str(tmp_path)
  save_random_run(workdir, folder_config(class_folder), [1])
  assert predict.main(["--workdir", workdir, "--top", "10", "--batch", "8",
                       os.path.join(class_folder, "train")]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[::11] == [os.path.join(class_folder, "train", c, "0.png") for c in CLASS_FOLDERS]
  for i in range(len(CLASS_FOLDERS)):
    rows = [LINE.match(line).groups() for line in lines[11 * i + 1:11 * i + 11]]
    assert sorted((int(c), name) for _, name, c in rows) == list(enumerate(CLASS_FOLDERS))


# --- mistakes: one line, exit status 1, nothing on stdout -------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, digits_files):
  """Files that are not usable images, and an empty folder."""
  folder = tmp_path_factory.mktemp("bad")
  (folder / "text.png").write_text("hello")
  (folder / "empty.jpg").write_bytes(b"")
  with open(digits_files[1][0], "rb") as f:
    (folder / "cut.png").write_bytes(f.read()[:60])
  jpeg = tf.io.encode_jpeg(tf.constant(np.full((40, 40, 3), 99, np.uint8))).numpy()
  (folder / "cut.jpg").write_bytes(jpeg[:len(jpeg) // 2])
  os.makedirs(folder / "nothing" / "deeper")
  return folder


@pytest.mark.parametrize("args,parts", [
    (["{good}", "{bad}/missing.png"], ["{bad}/missing.png: no such file or directory"]),
    (["{digits}/notes.txt"], ["{digits}/notes.txt: not an image (a BMP/GIF/JPEG/PNG file); "
                              "it starts with b'not an i'"]),
    (["{bad}/text.png", "{good}"], ["{bad}/text.png: not an image", "b'hello'"]),
    (["{bad}/empty.jpg"], ["{bad}/empty.jpg: not an image", "b''"]),
    (["{bad}/cut.png"], ["{bad}/cut.png: a damaged image that does not decode (Invalid PNG"]),
    (["{bad}/cut.jpg"], ["{bad}/cut.jpg: a damaged image that does not decode (jpeg::"]),
    (["{bad}/nothing"], ["{bad}/nothing: a directory without image files (.bmp, .gif"]),
    (["--top", "0", "{good}"], ["--top 0: expected a number of classes >= 1"]),
    (["--top", "-3", "{good}"], ["--top -3"]),
    (["--batch", "0", "{good}"], ["--batch 0: expected a number of images >= 1"]),
    (["--step", "3", "{good}"], ["has no checkpoint of step 3", "checkpoints: 2, 4"]),
    (["--step", "best", "{good}"], ["has no evaluation yet, so no best step"]),
    (["--workdir", "{bad}/nowhere", "{good}"], ["{bad}/nowhere does not exist"]),
    ([], ["the following arguments are required: IMAGE_OR_DIR", "usage:"]),
])
def test_a_mistake_is_one_line_and_prints_nothing(args, parts, digits_run, digits_files,
                                                  bad_files, capfd):
  names = dict(good=digits_files[1][0], bad=bad_files, digits=digits_files[0])
  args = [a.format(**names) for a in args]
  if "--workdir" not in args:
    args = ["--workdir", digits_run[0], *args]
  rc = predict.main(args)
  out, err = capfd.readouterr()  # TensorFlow's own log lines (fd 2) included
  assert rc == 1 and not out
  assert err.startswith("featdiv_jax: error: ") and err.count("\n") == 1, err
  for part in parts:
    assert part.format(**names) in err, (part, err)


def test_the_command_runs_as_a_module(digits_run, bad_files):
  """`python -m` with TensorFlow's C++ log at its default level: a damaged JPEG is our one line
  (libjpeg's complaint and TensorFlow's aborted rendezvous held back), no traceback."""
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
  path = str(bad_files / "cut.jpg")
  proc = subprocess.run([sys.executable, "-m", "featdiv_jax.predict", "--workdir",
                         digits_run[0], path], cwd=ROOT, env=env, text=True,
                        capture_output=True, check=False)
  assert proc.returncode == 1 and not proc.stdout
  assert proc.stderr.startswith(f"featdiv_jax: error: {path}: a damaged image")
  assert proc.stderr.count("\n") == 1, proc.stderr
