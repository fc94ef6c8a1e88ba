r"""Classify image files with a run's model: `python -m featdiv_jax.predict`.

  python -m featdiv_jax.predict --workdir W [--step latest|best|N] [--top K] [--batch B]
      [--json] IMAGE_OR_DIR...

Restores the run in W at checkpoint `--step` (default: the latest; `best` as for
`featdiv_jax.evaluate`) and prints, for each image, a line with its path and then its K most
probable classes (`--top`, default 5, at most the run's number of classes), most probable first,
as `probability  name (class index)`:

  digits/7.png
    0.9731  7 (7)
    0.0112  1 (1)

Probabilities are the softmax of the fused classifier's logits. Each image is preprocessed as
the run's eval pipeline preprocesses an example (`Preprocess.eval` of its data config: decode
[-> grayscale] -> resize the shorter side -> uint8 -> center crop, the same TensorFlow ops
through tf.data) and normalised with `dataset.mean` / `std` as the eval step does: a file of an
eval-split image gets the model input that evaluation gives it, bit for bit, and its outputs (up
to float rounding where the batch or the devices differ). Ties are listed in class order.

A directory stands for every image file in it and in its sub-directories, at any depth (names
ending in .bmp, .gif, .jpeg, .jpg or .png, any case), sorted by path: ROOT/test of an image
folder (dataset.data_dir=ROOT) is its whole test split. A file named on the command line is
taken whatever its name (the bytes say what it is). Paths are printed as given, a directory's
files as DIR/relative/path.

`--json` prints one JSON list instead: `[{"path": ..., "top": [{"class": 7, "name": "7",
"probability": 0.9731...}, ...]}, ...]`.

Class names are the data set's, in label order, less any `dataset.exclude_classes`: the TFDS
label names ("0".."9" for digits, prepared offline on first use as training does) or an image
folder's class-folder names. Where the run's data set cannot be opened here (a TFDS data set
not prepared in its data dir, an image folder that is gone), classes are named by their index,
with one warning line on stderr.

One process; the model runs on this process's default device, `--batch` images at a time
(default: the run's eval batch size, at most the number of images; the last batch is padded, so
the model compiles once). Every file is read and decoded before the model runs: a mistake (a
path that does not exist, a file that is not a readable, decodable image, a directory without
images, no checkpoint, an unknown step, a --top or --batch below 1) is one line
`featdiv_jax: error: ...` on stderr, exit status 1, and nothing is printed on stdout.
"""

import argparse
import json
import os
import sys

if __name__ == "__main__":  # `python -m featdiv_jax.predict`: before any library starts a thread
  from featdiv_jax import hostmem
  hostmem.at_entry_point()

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import numpy as np

from featdiv_jax import data, runs, steps
from featdiv_jax.cli import ToolParser as _Parser, UsageError, run_tool
from featdiv_jax.data import digits, images, sources
from featdiv_jax.evaluate import with_defaults

PROG = "python -m featdiv_jax.predict"


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog=PROG, description="Classify image files with a featdiv run's model.")
  p.add_argument("--workdir", required=True, help="the run's workdir (holds config.json)")
  p.add_argument("--step", default="latest",
                 help="checkpoint: latest (default), best (results.json's best eval step) or "
                      "a step number")
  p.add_argument("--top", type=int, default=5,
                 help="classes shown per image, most probable first (default 5)")
  p.add_argument("--batch", type=int, default=None,
                 help="images per model call (default: the run's eval_batch_size or "
                      "batch_size, at most the number of images)")
  p.add_argument("--json", action="store_true", help="print one JSON list instead of text")
  p.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR",
                 help="image files, and directories whose image files (at any depth) are all "
                      "classified")
  return p


def image_files(paths) -> list:
  """`paths` with each directory replaced by the image files in it and its sub-directories
  (by sources.IMAGE_EXTENSIONS), sorted by path. UsageError `<path>: <why>` for a path that does
  not exist or a directory without images."""
  def unlistable(e: OSError):
    raise UsageError(f"{e.filename}: cannot be listed ({e.strerror})")

  files = []
  for path in paths:
    if os.path.isdir(path):
      found = sorted(os.path.join(root, name)
                     for root, _, names in os.walk(path, onerror=unlistable)
                     for name in names if name.lower().endswith(sources.IMAGE_EXTENSIONS))
      if not found:
        raise UsageError(f"{path}: a directory without image files "
                         f"({', '.join(sources.IMAGE_EXTENSIONS)}), at any depth")
      files += found
    elif os.path.exists(path):
      files.append(path)
    else:
      raise UsageError(f"{path}: no such file or directory")
  return files


def class_names(dataset_config, num_classes: int) -> list:
  """The names of the run's `num_classes` classes, in label order (the data set's, less
  dataset.exclude_classes); their indices as names, with one warning line on stderr, where the
  data set cannot be opened here (never downloaded) or no longer has that many classes."""
  config = dataset_config.copy_and_resolve_references()
  config.download = False
  try:
    with digits.quietly():  # TFDS's notices about a folder it finds unprepared
      source = sources.open_source(config)
      excluded = sources.excluded_classes(source, tuple(config.exclude_classes))
  except data.DatasetError as e:
    # Its first sentence: the rest says how to prepare the data set for training.
    why = str(e).split(". ")[0]
  else:
    names = [str(n) for i, n in enumerate(source.class_names) if i not in excluded]
    if len(names) == num_classes:
      return names
    why = (f"data set {source.name!r} has {len(names)} classes here, the run's classifier "
           f"{num_classes}")
  print(f"featdiv_jax: warning: classes are named by index: {why}", file=sys.stderr, flush=True)
  return [str(i) for i in range(num_classes)]


def probabilities(run: runs.SavedRun, config, batches) -> np.ndarray:
  """float32 (examples in `batches`, classes): the softmax of the run's logits, each uint8 batch
  normalised as the eval step does, one compiled program for all batches."""
  model = steps.build_model(config.model, num_classes(run))
  variables = {"params": run.state["params"], "batch_stats": run.state["batch_stats"]}
  pixels = (tuple(config.dataset.mean), tuple(config.dataset.std))

  @jax.jit
  def forward(v, x):
    logits, _ = model.apply(v, steps.normalize_images(x, *pixels), False)
    return jax.nn.softmax(logits, axis=-1)

  return np.concatenate([np.asarray(forward(variables, batch)) for batch in batches])


def num_classes(run: runs.SavedRun) -> int:
  """The run's class count, read off its classifier (no data set needed)."""
  return int(np.shape(run.state["params"]["fc"]["bias"])[-1])


def predict(workdir: str, paths, which: str = "latest", top: int = 5, batch=None) -> list:
  """[{"path", "top": [{"class", "name", "probability"}, ...]}] for every image of `paths`
  (module docstring). Raises UsageError, RunError or DatasetError before the model runs."""
  if top < 1:
    raise UsageError(f"--top {top}: expected a number of classes >= 1")
  if batch is not None and batch < 1:
    raise UsageError(f"--batch {batch}: expected a number of images >= 1")
  files = image_files(paths)
  images.check_image_files(files)
  run = runs.load(workdir, which)
  config = with_defaults(run.config)
  names = class_names(config.dataset, num_classes(run))
  batch = min(batch or config.eval_batch_size or config.batch_size, len(files))
  probs = probabilities(run, config, images.eval_image_batches(config.dataset, files, batch))
  top = min(top, len(names))
  out = []
  for path, p in zip(files, probs):  # the last batch's padding left out
    order = np.argsort(-p, kind="stable")[:top]
    out.append({"path": path, "top": [{"class": int(c), "name": names[c],
                                       "probability": float(p[c])} for c in order]})
  return out


def text(predictions: list) -> str:
  """`predict`'s result as the module docstring shows it."""
  lines = []
  for prediction in predictions:
    lines.append(prediction["path"])
    lines += [f"  {t['probability']:.4f}  {t['name']} ({t['class']})" for t in prediction["top"]]
  return "\n".join(lines)


def main(argv) -> int:
  """`argv` without the program name; returns the exit status (0, or 1 for a mistake)."""
  def action(args):
    predictions = predict(args.workdir, args.paths, args.step, args.top, args.batch)
    return json.dumps(predictions, indent=2) if args.json else text(predictions)
  return run_tool(argv, parser(), action, (UsageError, runs.RunError, data.DatasetError))


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
