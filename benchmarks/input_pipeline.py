r"""Input pipeline throughput against the training step's, on one machine in one run.

  python benchmarks/input_pipeline.py --config digits  [--batches 60] [--no-step]
  python benchmarks/input_pipeline.py --config cifar10 [--examples 5000]
  python benchmarks/input_pipeline.py --config jpeg224 [--examples 600] [--epochs 2]

Times `featdiv_jax.data.train_batches` (read, shuffle, decode, augment, batch: the training
loop's own stream) for the config's default variant at its batch size, then one training step
of the same shapes with `featdiv_jax.bench` (unless `--no-step`), and prints both in images/s
and their ratio: above 1, the pipeline outruns the step. Under `featdiv_jax.hostmem`'s malloc
settings, as training runs (`FEATDIV_MALLOC=default` for glibc's).

`digits` reads the embedded data set. CIFAR-10 needs a download, so `cifar10` writes
`--examples` random 32x32 PNGs (CIFAR-10's size and encoding in TFDS) into an image folder and
runs the cifar10 config's pipeline (pad-4 crop, flip) on it. `jpeg224` writes `--examples`
random JPEGs of 300x400 and 400x300 pixels and runs caltech101's pipeline (resize to 256, random
224 crop, flip) with `dataset.cache=none` (decoded and resized every epoch) and `memory`
(decoded once, then cropped from memory): their steady rates over `--epochs` epochs after the
first, the cache's one-off fill time, and the ratio. Runs on CPU.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str):
  from featdiv_jax import configlib
  config = configlib.load_config_file(os.path.join(ROOT, "configs", f"{name}.py"), "multi_cos")
  config.unlock()
  return config


def write_pngs(root: str, examples: int, size: int = 32, classes: int = 10) -> None:
  """`examples` random PNG images in root/train/<class>/ (and a small root/test/)."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for split, n in (("train", examples), ("test", classes)):
    for i in range(n):
      folder = os.path.join(root, split, f"c{i % classes}")
      os.makedirs(folder, exist_ok=True)
      pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))


def write_jpegs(root: str, examples: int, classes: int = 10) -> None:
  """`examples` random JPEGs (300x400 or 400x300) in root/train/<class>/, 10 in root/test/."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for split, n in (("train", examples), ("test", classes)):
    for i in range(n):
      folder = os.path.join(root, split, f"c{i % classes}")
      os.makedirs(folder, exist_ok=True)
      shape = (300, 400, 3) if i % 2 else (400, 300, 3)
      # smooth random images, closer to photographs than white noise is (JPEG's size and speed)
      small = rng.integers(0, 256, (shape[0] // 20, shape[1] // 20, 3), dtype=np.uint8)
      image = Image.fromarray(small).resize((shape[1], shape[0]), Image.BILINEAR)
      image.save(os.path.join(folder, f"{i}.jpg"), quality=90)


def time_cache(config, epochs: int) -> dict:
  """Images/s of the stream with dataset.cache none and memory, steady over `epochs` epochs
  after the first (which fills the cache), and the fill's seconds."""
  from featdiv_jax import data
  out = {}
  per_epoch = data.dataset_info(config.dataset).train_size // config.batch_size
  for mode in ("none", "memory"):
    config.dataset.cache = mode
    start = time.perf_counter()
    it = data.train_batches(config.dataset, global_batch_size=config.batch_size, seed=0)
    for _ in range(per_epoch):
      next(it)
    out[f"{mode}_first_epoch_s"] = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(epochs * per_epoch):
      next(it)
    out[f"{mode}_img_per_s"] = epochs * per_epoch * config.batch_size / (
        time.perf_counter() - start)
  return out


def time_pipeline(config, batches: int, warmup: int = 5) -> float:
  """Images/s of the training stream, after `warmup` batches (tf.data fills its buffers)."""
  from featdiv_jax import data
  it = data.train_batches(config.dataset, global_batch_size=config.batch_size, seed=0)
  for _ in range(warmup):
    next(it)
  t = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  seconds = time.perf_counter() - t
  assert batch["image"].shape[0] == config.batch_size
  return batches * config.batch_size / seconds


def time_step(config) -> float:
  from featdiv_jax import bench
  m = config.model
  args = bench.parse_args([
      "--arch", m.arch, "--heads", str(m.num_heads), "--image-size",
      str(config.dataset.image_size), "--batch", str(config.batch_size), "--stem", m.stem,
      "--steps", "5", "--dtype", m.dtype])
  return bench.run(args)["img_per_s"]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", choices=["digits", "cifar10", "jpeg224"], default="digits")
  p.add_argument("--batches", type=int, default=60, help="timed batches")
  p.add_argument("--examples", type=int, default=5000, help="cifar10: synthetic PNGs to write")
  p.add_argument("--no-step", action="store_true", help="time the pipeline only")
  p.add_argument("--epochs", type=int, default=2, help="jpeg224: timed epochs after the first")
  args = p.parse_args(argv)
  if args.config == "jpeg224":
    return jpeg224(args)
  config = load_config(args.config)
  with tempfile.TemporaryDirectory() as tmp:
    if args.config == "cifar10":
      write_pngs(tmp, args.examples)
      config.dataset.name, config.dataset.data_dir = "imagefolder", tmp
    pipeline = time_pipeline(config, args.batches)
  print(f"{args.config}: input pipeline {pipeline:,.0f} img/s (batch {config.batch_size}, "
        f"{os.cpu_count()} CPUs)", flush=True)
  if not args.no_step:
    step = time_step(config)
    print(f"{args.config}: training step {step:,.0f} img/s ({config.model.arch}, "
          f"{config.model.num_heads} heads, {config.dataset.image_size}px, {config.model.stem} "
          f"stem); pipeline / step = {pipeline / step:.1f}x", flush=True)
  return 0


def jpeg224(args) -> int:
  config = load_config("caltech101")
  with tempfile.TemporaryDirectory() as tmp:
    write_jpegs(tmp, args.examples)
    config.dataset.name, config.dataset.data_dir = "imagefolder", tmp
    config.dataset.exclude_classes, config.dataset.holdout_fraction = (), 0.0
    config.dataset.train_split, config.dataset.eval_split = "train", "test"
    config.batch_size = min(config.batch_size, args.examples)
    r = time_cache(config, args.epochs)
  print(f"jpeg224: {args.examples} JPEGs, resize 256, crop 224, batch {config.batch_size}, "
        f"{os.cpu_count()} CPUs", flush=True)
  for mode in ("none", "memory"):
    print(f"  dataset.cache={mode:<6}: first epoch {r[f'{mode}_first_epoch_s']:.1f} s, then "
          f"{r[f'{mode}_img_per_s']:,.0f} img/s", flush=True)
  print(f"  cache / none = {r['memory_img_per_s'] / r['none_img_per_s']:.1f}x", flush=True)
  return 0


if __name__ == "__main__":
  from featdiv_jax import hostmem
  hostmem.at_entry_point()  # as in training (featdiv_jax.main): one malloc arena on CPU
  sys.exit(main())
