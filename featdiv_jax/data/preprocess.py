"""Per-example image preprocessing in TensorFlow: decode, resize, pad, crop, flip (to uint8).

Train: decode [-> grayscale] -> resize shorter side -> uint8 | zero pad -> random (or center)
       crop, or random_resized: an Inception-style crop resized to the crop size -> random flip.
Eval:  decode [-> grayscale] -> resize shorter side -> uint8 | center crop.
What comes before `|` (`Preprocess.decoded`) is what `dataset.cache` keeps in memory. Images
stay uint8; the training step normalises them on the device with dataset.mean / std.
Randomness comes only from `tf.random.stateless_*` with an explicit seed pair, so an example's
augmentation is a pure function of (seed, element index) and survives a resume-by-skip.
"""

import dataclasses
import math
import numbers
from typing import Any, Optional, Tuple

import tensorflow as tf

from featdiv_jax.data.errors import TRAIN_CROPS, DatasetError

# PIL's `Image.convert('L')` (Pillow's Convert.c): L = (R*19595 + G*38470 + B*7471 + 0x8000) >> 16,
# the documented R*299/1000 + G*587/1000 + B*114/1000 in 16-bit fixed point, rounded. Computed
# here in integers it equals PIL on all 2**24 colours (checked against Pillow 13); TF's
# tf.image.rgb_to_grayscale (weights 0.2989/0.5870/0.1140) is 1 level darker on 26% of them.
GRAY_WEIGHTS = (19595, 38470, 7471)
# torchvision's RandomResizedCrop (as timm uses it): boxes tried before the central fallback.
RESIZED_CROP_ATTEMPTS = 10


def config_field(dataset_config, field: str) -> Any:
  """`dataset_config.<field>`, or a DatasetError naming the missing field."""
  try:
    return getattr(dataset_config, field)
  except (AttributeError, KeyError):
    raise DatasetError(f"the data config has no field {field!r}") from None


def check_int(value, what: str, minimum: int) -> int:
  # bool is an int subclass, but `pad=True` is a mistake worth reporting.
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
    raise DatasetError(f"{what} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def optional_field(dataset_config, field: str, default) -> Any:
  """`dataset_config.<field>`, or `default` for a config written before the field existed."""
  try:
    return getattr(dataset_config, field)
  except (AttributeError, KeyError):
    return default


def int_field(dataset_config, field: str, minimum: int) -> int:
  return check_int(config_field(dataset_config, field), f"dataset.{field}", minimum)


def _triple(dataset_config, field: str, positive: bool) -> Tuple[float, float, float]:
  value = config_field(dataset_config, field)
  try:
    triple = tuple(float(v) for v in value)
  except (TypeError, ValueError):
    triple = ()
  if len(triple) != 3 or (positive and min(triple) <= 0):
    need = "3 numbers > 0" if positive else "3 numbers"
    raise DatasetError(f"dataset.{field} must be {need} (one per RGB channel, in [0, 1] pixel "
                       f"units), got {value!r}")
  return triple


def _range(dataset_config, field: str, default: Tuple[float, float],
           upper: float = math.inf) -> Tuple[float, float]:
  """A (low, high) range field, 0 < low <= high <= upper; `default` for configs saved before it
  existed."""
  value = optional_field(dataset_config, field, default)
  try:
    pair = tuple(float(v) for v in value)
  except (TypeError, ValueError):
    pair = ()
  if len(pair) != 2 or not 0 < pair[0] <= pair[1] <= upper:
    bound = "" if upper == math.inf else f" <= {upper:g}"
    raise DatasetError(f"dataset.{field} must be two numbers 0 < low <= high{bound}, got "
                       f"{value!r}")
  return pair


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """The preprocessing fields of a data config, validated."""
  image_size: int
  resize_size: int = 0
  pad: int = 0
  flip: bool = False
  mean: Tuple[float, float, float] = (0.0, 0.0, 0.0)
  std: Tuple[float, float, float] = (1.0, 1.0, 1.0)
  # "random"; "center": the eval crop; "random_resized": torchvision's
  # RandomResizedCrop(image_size, crop_scale, crop_ratio). Each after any pad, then the flip.
  train_crop: str = "random"
  grayscale: bool = False     # PIL's convert('L') right after decoding, repeated to 3 channels
  crop_scale: Tuple[float, float] = (0.08, 1.0)  # random_resized: the box's area fraction range
  crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)  # ... and its aspect ratio (w / h) range

  @classmethod
  def from_config(cls, dataset_config) -> "Preprocess":
    flags = {"flip": config_field(dataset_config, "flip"),
             "grayscale": optional_field(dataset_config, "grayscale", False)}
    for field, value in flags.items():
      if not isinstance(value, bool):
        raise DatasetError(f"dataset.{field} must be True or False, got {value!r}")
    train_crop = optional_field(dataset_config, "train_crop", "random")
    if train_crop not in TRAIN_CROPS:
      raise DatasetError(f"dataset.train_crop must be one of {', '.join(TRAIN_CROPS)}, got "
                         f"{train_crop!r}")
    return cls(image_size=int_field(dataset_config, "image_size", 1),
               resize_size=int_field(dataset_config, "resize_size", 0),
               pad=int_field(dataset_config, "pad", 0),
               mean=_triple(dataset_config, "mean", positive=False),
               std=_triple(dataset_config, "std", positive=True),
               train_crop=train_crop,
               crop_scale=_range(dataset_config, "crop_scale", cls.crop_scale, upper=1.0),
               crop_ratio=_range(dataset_config, "crop_ratio", cls.crop_ratio), **flags)

  def train(self, encoded: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Encoded image bytes and an int64 seed pair -> augmented uint8 (S, S, 3)."""
    return self.augment(self.decoded(encoded), seed)

  def eval(self, encoded: tf.Tensor) -> tf.Tensor:
    """Encoded image bytes -> deterministic uint8 (S, S, 3)."""
    return self.eval_crop(self.decoded(encoded))

  def decoded(self, encoded: tf.Tensor) -> tf.Tensor:
    """Encoded bytes -> uint8 (H, W, 3): decoded [, grayscale] and resized, the part of the
    preprocessing that does not depend on the seed (what `dataset.cache` keeps)."""
    image = decode(encoded, grayscale=self.grayscale)
    if self.resize_size:
      image = resize_shorter_side(image, self.resize_size)
    return to_uint8(image)

  def augment(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """A `decoded` image and an int64 seed pair -> uint8 (S, S, 3): pad, crop, flip."""
    if self.pad:
      # random_resized crops the padded image too: dataset.pad is applied before whichever train
      # crop is configured (with random_resized some boxes then hold zero borders).
      image = tf.pad(image, [[self.pad, self.pad], [self.pad, self.pad], [0, 0]])
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    if self.train_crop == "random_resized":
      # Any box is resized to the crop size: a small image needs no `at_least` upscale.
      height, width = _hw(image)
      box = random_resized_boxes(height, width, crop_seed, 1, self.crop_scale, self.crop_ratio)
      image = resized_crop(image, *(b[0] for b in box), size=self.image_size)
    else:
      image = at_least(image, self.image_size)
      if self.train_crop == "center":
        # The notebooks' Resize + CenterCrop: with pad 0 exactly the eval image. A symmetric pad
        # changes nothing here unless the image is smaller than the crop.
        image = center_crop(image, self.image_size)
      else:
        image = tf.image.stateless_random_crop(
            image, [self.image_size, self.image_size, 3], seed=crop_seed)
    if self.flip:
      image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return image

  def static_decoded_shape(self, source_shape) -> Optional[Tuple[int, int]]:
    """(H, W) that every `decoded` image has when the source's images share one size
    `source_shape` (H, W, C), and padding keeps them at least the crop's size; else None."""
    if source_shape is None or None in tuple(source_shape)[:2]:
      return None
    h, w = int(source_shape[0]), int(source_shape[1])
    if self.resize_size:  # as resize_shorter_side computes it (float64, floored)
      r = self.resize_size
      h, w = (r, math.floor(r * w / h)) if h <= w else (math.floor(r * h / w), r)
    if self.train_crop != "random_resized" and min(h, w) + 2 * self.pad < self.image_size:
      return None  # at_least would upscale: left to the per-image path
    return h, w

  def augment_batch(self, images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """`augment` for a batch of `decoded` images of one static size, uint8 (B, H, W, 3), and one
    int64 seed pair: each image padded, cropped at its own offset and flipped by its own coin,
    all drawn at once for the batch. A few ops per batch instead of a dozen per image: what
    keeps the pipeline's CPU time small next to a short training step.

    random_resized: each image's own box (all drawn at once), cropped and resized one image at a
    time by `resized_crop` as in `augment` (boxes differ in size, and tf.image.crop_and_resize
    samples with aligned corners and no antialiasing, unlike tf.image.resize)."""
    if self.pad:  # as in `augment`, random_resized included
      p = self.pad
      images = tf.pad(images, [[0, 0], [p, p], [p, p], [0, 0]])
    h, w, size = images.shape[1], images.shape[2], self.image_size
    count = tf.shape(images)[0]
    draws = tf.random.stateless_uniform([3, count], seed=seed, minval=0,
                                        maxval=1 << 62, dtype=tf.int64)
    if self.train_crop == "random_resized":
      box_seed = tf.random.experimental.stateless_fold_in(seed, 1)  # independent of `draws`
      boxes = random_resized_boxes(h, w, box_seed, count, self.crop_scale, self.crop_ratio)
      images = tf.map_fn(lambda args: resized_crop(*args, size=size), (images, *boxes),
                         fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
    else:
      if self.train_crop == "center":
        top, left = (h - size) // 2 + 0 * draws[0], (w - size) // 2 + 0 * draws[1]
      else:
        top, left = draws[0] % (h - size + 1), draws[1] % (w - size + 1)
      span = tf.range(size, dtype=tf.int64)[None]
      images = tf.gather(images, top[:, None] + span, axis=1, batch_dims=1)
      images = tf.gather(images, left[:, None] + span, axis=2, batch_dims=1)
    if self.flip:
      flip = tf.equal(draws[2] % 2, 1)[:, None, None, None]
      images = tf.where(flip, tf.reverse(images, [2]), images)
    return tf.ensure_shape(images, [None, size, size, 3])

  def eval_crop(self, image: tf.Tensor) -> tf.Tensor:
    """A `decoded` image -> its uint8 (S, S, 3) center crop."""
    return center_crop(at_least(image, self.image_size), self.image_size)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """0..255 float pixels -> uint8, rounded to the nearest level (as PIL's resize stores them).

  Batches travel as uint8 and are normalised on the device (`steps.normalize_images`)."""
  if image.dtype == tf.uint8:
    return image
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def decode(encoded: tf.Tensor, grayscale: bool = False) -> tf.Tensor:
  """PNG/JPEG/BMP/GIF bytes -> float32 (H, W, 3) in 0..255; grayscale and RGBA become RGB.

  `grayscale`: PIL's convert('L') of the decoded 8-bit pixels, repeated to 3 channels.
  """
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  if grayscale:
    image = to_grayscale(image)
  return tf.cast(image, tf.float32)


def to_grayscale(image: tf.Tensor) -> tf.Tensor:
  """uint8 (H, W, 3) RGB -> uint8 (H, W, 3), each channel PIL's `convert('L')` value."""
  weighted = tf.cast(image, tf.int32) * tf.constant(GRAY_WEIGHTS, tf.int32)
  gray = tf.bitwise.right_shift(tf.reduce_sum(weighted, axis=-1, keepdims=True) + 0x8000, 16)
  return tf.tile(tf.cast(gray, tf.uint8), [1, 1, 3])


def _hw(image):
  shape = tf.shape(image)
  return shape[0], shape[1]


def resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
  """torchvision `Resize(size)`: shorter side -> size, longer side int(size * long / short)."""
  h, w = _hw(image)
  h64, w64 = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
  new_h = tf.where(h <= w, size, tf.cast(tf.floor(size * h64 / w64), tf.int32))
  new_w = tf.where(h <= w, tf.cast(tf.floor(size * w64 / h64), tf.int32), size)
  return _resize(image, new_h, new_w)


def _resize(image: tf.Tensor, new_h: tf.Tensor, new_w: tf.Tensor) -> tf.Tensor:
  """Bilinear, antialiased when shrinking (like torchvision/PIL)."""
  h, w = _hw(image)
  size = tf.stack([new_h, new_w])
  # When enlarging, antialiasing changes nothing (to float rounding) but costs time
  # (docs/performance.md, "Figures behind code comments").
  return tf.cond(tf.logical_or(new_h < h, new_w < w),
                 lambda: tf.image.resize(image, size, method="bilinear", antialias=True),
                 lambda: tf.image.resize(image, size, method="bilinear"))


def at_least(image: tf.Tensor, size: int) -> tf.Tensor:
  """Upscales (keeping aspect) only if a side is shorter than `size`, so a crop always fits.
  Keeps the dtype (uint8 is rounded after the resize)."""
  h, w = _hw(image)
  short = tf.minimum(h, w)

  def upscale():
    scale = size / tf.cast(short, tf.float64)
    new_h = tf.maximum(size, tf.cast(tf.math.ceil(tf.cast(h, tf.float64) * scale), tf.int32))
    new_w = tf.maximum(size, tf.cast(tf.math.ceil(tf.cast(w, tf.float64) * scale), tf.int32))
    resized = tf.image.resize(tf.cast(image, tf.float32), tf.stack([new_h, new_w]),
                              method="bilinear")
    return to_uint8(resized) if image.dtype == tf.uint8 else tf.cast(resized, image.dtype)

  return tf.cond(short < size, upscale, lambda: image)


def random_resized_boxes(height, width, seed: tf.Tensor, count, scale: Tuple[float, float],
                         ratio: Tuple[float, float]) -> Tuple[tf.Tensor, ...]:
  """torchvision's `RandomResizedCrop.get_params` for `count` images of one (height, width), drawn
  statelessly from an int64 seed pair: (top, left, box_height, box_width), int32 (count,) each.

  Per image, RESIZED_CROP_ATTEMPTS boxes (all drawn at once) of area fraction uniform in `scale`
  and aspect ratio w / h log-uniform in `ratio`; the first that fits is placed uniformly in the
  image, else the central crop of the image's aspect clamped to `ratio`."""
  shape = [count, RESIZED_CROP_ATTEMPTS]
  area_seed, ratio_seed, offset_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=3))
  fractions = tf.random.stateless_uniform(shape, area_seed, scale[0], scale[1], tf.float64)
  log_ratios = tf.random.stateless_uniform(shape, ratio_seed, math.log(ratio[0]),
                                           math.log(ratio[1]), tf.float64)
  offsets = tf.random.stateless_uniform([2, count], offset_seed, 0, 1 << 62, tf.int64)
  return boxes_from_draws(height, width, fractions, log_ratios, offsets, ratio)


def boxes_from_draws(height, width, fractions: tf.Tensor, log_ratios: tf.Tensor,
                     offsets: tf.Tensor, ratio: Tuple[float, float]) -> Tuple[tf.Tensor, ...]:
  """`random_resized_boxes` given its draws: float64 (count, attempts) area fractions and log
  aspect ratios, int64 (2, count) nonnegative offset draws (reduced modulo the free rows and
  columns)."""
  height, width = tf.cast(height, tf.int64), tf.cast(width, tf.int64)
  h64, w64 = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  area, aspect = h64 * w64 * fractions, tf.exp(log_ratios)
  # Python's round() as torchvision calls it: half to even, like tf.round.
  box_w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int64)
  box_h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int64)
  fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)  # 0 when none fits
  accepted = tf.reduce_any(fits, axis=1)
  box_h = tf.gather(box_h, first, axis=1, batch_dims=1)
  box_w = tf.gather(box_w, first, axis=1, batch_dims=1)
  # The fallback: the whole image, or its central part of the nearest aspect in `ratio` (at
  # least one pixel, where torchvision would give an empty box).
  in_ratio = w64 / h64
  fall_h = tf.where(in_ratio < ratio[0], tf.round(w64 / ratio[0]), h64)
  fall_w = tf.where(in_ratio > ratio[1], tf.round(h64 * ratio[1]), w64)
  fall_h, fall_w = (tf.maximum(tf.cast(x, tf.int64), 1) for x in (fall_h, fall_w))
  box_h = tf.where(accepted, box_h, fall_h)
  box_w = tf.where(accepted, box_w, fall_w)
  top = tf.where(accepted, offsets[0] % (height - box_h + 1), (height - box_h) // 2)
  left = tf.where(accepted, offsets[1] % (width - box_w + 1), (width - box_w) // 2)
  return tuple(tf.cast(x, tf.int32) for x in (top, left, box_h, box_w))


def resized_crop(image: tf.Tensor, top: tf.Tensor, left: tf.Tensor, box_height: tf.Tensor,
                 box_width: tf.Tensor, size: int) -> tf.Tensor:
  """The box of an (H, W, 3) image resized to uint8 (size, size, 3): bilinear, antialiased when
  shrinking, rounded to the nearest level (as `decoded` resizes)."""
  box = tf.slice(image, tf.stack([top, left, 0]), tf.stack([box_height, box_width, 3]))
  resized = _resize(tf.cast(box, tf.float32), tf.constant(size), tf.constant(size))
  return tf.ensure_shape(to_uint8(resized), [size, size, 3])


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  h, w = _hw(image)
  image = tf.image.crop_to_bounding_box(image, (h - size) // 2, (w - size) // 2, size, size)
  return tf.ensure_shape(image, [size, size, 3])
