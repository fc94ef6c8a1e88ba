r"""Draw what each head of a run looks at: `python -m featdiv_jax.visualize`.

  python -m featdiv_jax.visualize --workdir W [--images N] [--split S] [--step latest|best|N]
      --out F.png

Restores the run in W at checkpoint `--step` (default: the latest; `best` as for
`featdiv_jax.evaluate`), runs it on the first N examples (default 8) of split S of the run's
data set (default: its `dataset.eval_split`, in stored order) and writes one PNG with one row per
image and 1 + 2K columns for K heads:

- column 0: the input image (the eval pipeline's uint8 crop, which the model sees normalised
  with the run's `dataset.mean` / `dataset.std`), titled with its label and the run's prediction;
- per head k, two columns, each overlaid on the image (bilinearly upsampled from the head's
  pre-pool (H, W) feature map to the image size):
  - `hk mean`: the head's mean over its C channels, on one colour scale shared by the row's
    heads (0 to the row's largest value), so heads can be compared on the same image; the
    title gives the map's largest value;
  - `hk ch c`: the head's strongest channel c for this image (largest mean activation over
    H, W), on its own scale; the title also lists the head's top-3 channels, strongest first.

The image is deterministic in size: with PANEL_INCHES = 2 and DPI = 80 (160 pixels per panel),
a figure of N images and K heads is (1 + 2K) * 160 pixels wide and N * 160 pixels high
(`figure_size`). An `imagenet`-stem run at 32x32 has a 1x1 final map, whose overlay is one
colour; a `cifar`-stem run has 4x4.

One process; the model runs on this process's default device. A mistake (no such workdir, no
checkpoint, an unknown step or split, --images below 1 or above the split's size, an output that
is not a .png in an existing directory) is one line `featdiv_jax: error: ...` on stderr, exit
status 1, and nothing is written. Only `featdiv_jax.data` imports TensorFlow.
"""

import argparse
import functools
import os
import sys
from typing import NamedTuple

if __name__ == "__main__":  # `python -m featdiv_jax.visualize`: before any library starts a thread
  from featdiv_jax import hostmem
  hostmem.at_entry_point()

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from featdiv_jax import data, runs, steps
from featdiv_jax.cli import ToolParser as _Parser, UsageError, run_tool
from featdiv_jax.evaluate import with_defaults

PROG = "python -m featdiv_jax.visualize"
PANEL_INCHES = 2.0  # exact in binary, so the pixel size below is exact
DPI = 80
TOP_CHANNELS = 3
CMAP = "inferno"
ALPHA = 0.55  # opacity of a map over its image


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog=PROG, description="Draw each head's feature maps of a featdiv run.")
  p.add_argument("--workdir", required=True, help="the run's workdir (holds config.json)")
  p.add_argument("--images", type=int, default=8, help="how many images, one row each (default 8)")
  p.add_argument("--split", default=None,
                 help="split of the run's data set (default: its dataset.eval_split)")
  p.add_argument("--step", default="latest",
                 help="checkpoint: latest (default), best (results.json's best eval step) or "
                      "a step number")
  p.add_argument("--out", required=True, help="the .png file to write")
  return p


def num_columns(num_heads: int) -> int:
  """The input image, then a channel-mean and a strongest-channel panel per head."""
  return 1 + 2 * num_heads


def figure_size(num_images: int, num_heads: int) -> tuple[int, int]:
  """(width, height) in pixels of the PNG for `num_images` rows and `num_heads` heads."""
  panel = round(PANEL_INCHES * DPI)
  return num_columns(num_heads) * panel, num_images * panel


class HeadMaps(NamedTuple):
  """What is drawn for each head k and image b, upsampled to the images' (S, S)."""
  mean: np.ndarray      # (K, B, S, S): the mean over channels
  channels: np.ndarray  # (K, B, TOP): channel indices, largest mean activation first
  strongest: np.ndarray  # (K, B, S, S): the map of channels[k, b, 0]


@functools.partial(jax.jit, static_argnames=("image_size", "top"))
def _head_maps(features, image_size: int, top: int):
  k, b = features.shape[:2]
  features = features.astype(jnp.float32)
  upsample = lambda m: jax.image.resize(m, (k, b, image_size, image_size), "bilinear")
  _, channels = jax.lax.top_k(jnp.mean(features, axis=(2, 3)), top)         # (K, B, top)
  strongest = jnp.take_along_axis(
      features, channels[:, :, None, None, :1], axis=-1)[..., 0]             # (K, B, H, W)
  return upsample(jnp.mean(features, axis=-1)), channels, upsample(strongest)


def head_maps(features, image_size: int, top: int = TOP_CHANNELS) -> HeadMaps:
  """The drawn maps of features (K, B, H, W, C) for images of size `image_size`; `top` is
  capped at C."""
  if np.ndim(features) != 5:
    raise ValueError(f"features must be (K, B, H, W, C), got shape {np.shape(features)}")
  top = min(top, np.shape(features)[-1])
  return HeadMaps(*map(np.asarray, _head_maps(jnp.asarray(features), image_size, top)))


def draw(images: np.ndarray, maps: HeadMaps, labels, predictions, out: str) -> None:
  """Writes the figure of `images` (B, S, S, 3) in [0, 1] and their `maps` to `out` (PNG)."""
  num_heads, num_images = maps.mean.shape[:2]
  cols = num_columns(num_heads)
  fig = Figure(figsize=(cols * PANEL_INCHES, num_images * PANEL_INCHES), dpi=DPI)
  FigureCanvasAgg(fig)  # Agg, without pyplot's global figure state
  axes = fig.subplots(num_images, cols, squeeze=False)
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.25 / num_images,
                      wspace=0.05, hspace=0.3)
  for b in range(num_images):
    axes[b, 0].imshow(images[b])
    _title(axes[b, 0], f"label {labels[b]} / pred {predictions[b]}")
    row_max = float(maps.mean[:, b].max())
    for k in range(num_heads):
      channels = [int(c) for c in maps.channels[k, b]]
      mean_ax, top_ax = axes[b, 1 + 2 * k], axes[b, 2 + 2 * k]
      _overlay(mean_ax, images[b], maps.mean[k, b], row_max)
      _title(mean_ax, f"h{k} mean\nmax {float(maps.mean[k, b].max()):.3g}")
      _overlay(top_ax, images[b], maps.strongest[k, b], float(maps.strongest[k, b].max()))
      _title(top_ax, f"h{k} ch {channels[0]}\ntop {', '.join(map(str, channels))}")
  for ax in axes.flat:
    ax.set_axis_off()
  tmp = f"{out}.tmp.{os.getpid()}"
  try:
    fig.savefig(tmp, dpi=DPI, format="png")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _title(ax, text: str) -> None:
  ax.set_title(text, fontsize=7, pad=2)


def _overlay(ax, image, heat, vmax: float) -> None:
  ax.imshow(image)
  # A constant map (a 1x1 final map, or all zeros) is drawn at the top of its scale, not as NaN.
  ax.imshow(heat, cmap=CMAP, alpha=ALPHA, vmin=0.0, vmax=vmax if vmax > 0 else 1.0,
            interpolation="nearest")


def _check_out(out: str) -> str:
  out = os.path.abspath(out)
  if not out.endswith(".png"):
    raise UsageError(f"--out {out}: expected a .png file")
  if not os.path.isdir(os.path.dirname(out)):
    raise UsageError(f"--out {out}: directory {os.path.dirname(out)} does not exist")
  return out


def first_examples(dataset_config, num_images: int) -> dict:
  """The eval split's first `num_images` examples {"image", "label"}, in stored order."""
  _, make_iter = data.eval_batches(dataset_config, global_batch_size=num_images,
                                   process_index=0, process_count=1)
  batch = next(iter(make_iter()))
  return {"image": batch["image"], "label": batch["label"]}


def visualize(workdir: str, num_images: int = 8, split=None, which: str = "latest",
              out: str = "heads.png") -> dict:
  """Writes the figure (module docstring) of the run in `workdir` to `out`; returns what the
  printed line says. Raises RunError, DatasetError or UsageError, before writing anything."""
  if num_images < 1:
    raise UsageError(f"--images {num_images}: expected a positive number of images (>= 1)")
  out = _check_out(out)
  run = runs.load(workdir, which)
  config = with_defaults(run.config)
  if split is not None:
    config.dataset.eval_split = split
  info = data.dataset_info(config.dataset)
  if num_images > info.eval_size:
    raise UsageError(f"--images {num_images}: split {config.dataset.eval_split!r} has "
                     f"{info.eval_size} examples; valid: 1..{info.eval_size}")
  examples = first_examples(config.dataset, num_images)
  model = steps.build_model(config.model, info.num_classes)
  variables = {"params": run.state["params"], "batch_stats": run.state["batch_stats"]}
  pixels = (tuple(config.dataset.mean), tuple(config.dataset.std))
  logits, features = jax.jit(
      lambda v, x: model.apply(v, steps.normalize_images(x, *pixels), False))(
          variables, examples["image"])
  size = examples["image"].shape[1]
  maps = head_maps(features, size)
  draw(np.asarray(examples["image"], np.float32) / 255.0, maps,
       np.asarray(examples["label"]), np.asarray(jnp.argmax(logits, -1)), out)
  width, height = figure_size(num_images, config.model.num_heads)
  return dict(out=out, workdir=run.workdir, step=run.step, split=config.dataset.eval_split,
              images=num_images, num_heads=config.model.num_heads,
              feature_map=list(features.shape[2:]), width=width, height=height)


def summary_line(result: dict) -> str:
  h, w, c = result["feature_map"]
  return (f"{result['images']} images of {result['split']} at step {result['step']}, "
          f"{result['num_heads']} head(s) with {h}x{w}x{c} feature maps -> {result['out']} "
          f"({result['width']}x{result['height']} px)")


def main(argv) -> int:
  """`argv` without the program name; returns the exit status (0, or 1 for a mistake)."""
  def action(args):
    return summary_line(visualize(args.workdir, args.images, args.split, args.step, args.out))
  return run_tool(argv, parser(), action, (UsageError, runs.RunError, data.DatasetError))


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
