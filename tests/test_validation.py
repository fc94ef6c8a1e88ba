"""Bad input is refused before any work starts, with one message naming the field, the value and
what is valid; from the command line: exit status 1, one stderr line, no traceback, and the
workdir left exactly as it was. A property test throws random overrides at the validation."""

import json
import math
import os
import pathlib

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
import tensorflow as tf

from featdiv_jax import configlib, data, main, models, sharding, steps, train
from featdiv_jax.models import timm_import

ROOT = pathlib.Path(__file__).parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
NUM_DEVICES = 8  # tests/conftest.py simulates 8 CPU devices


def smoke_config(arg="multi_cos,smoke", overrides=()):
  """The tiny two-head config every case starts from, with `(field, value)` overrides."""
  c = configlib.apply_arg(configlib.default_config(), arg)
  for field, value in overrides:
    configlib.override(c, field, value)
  return c


def rejection(config, num_devices=NUM_DEVICES, process_count=1) -> str:
  with pytest.raises(configlib.ConfigError) as e:
    configlib.validate(config, num_devices, process_count)
  return str(e.value)


def assert_names(message, *parts):
  for part in parts:
    assert part in message, f"{part!r} not in {message!r}"


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  """The digits data set, prepared once (no network needed)."""
  path = str(tmp_path_factory.mktemp("tfds"))
  data.dataset_info(smoke_config(overrides=[("dataset.data_dir", path)]).dataset)
  return path


# --- configlib.validate: one case per kind of mistake ---------------------------------------

ARCHS = "seresnet18, seresnet34, seresnet50"
# (base variant, overrides, what the message must contain: field=value and the valid set)
INVALID = {
    "no heads": ("multi_cos", [("model.num_heads", 0)], ["model.num_heads=0", "an integer >= 1"]),
    "negative heads": ("multi", [("model.num_heads", -2)], ["model.num_heads=-2", ">= 1"]),
    "penalty on one head": ("single", [("penalty.weight", 1.0)],
                            ["penalty.weight=1.0", "model.num_heads=1", "num_heads >= 2"]),
    "negative penalty": ("multi_cos", [("penalty.weight", -1.0)],
                         ["penalty.weight=-1.0", "a finite number >= 0"]),
    "infinite penalty": ("multi_cos", [("penalty.weight", math.inf)],
                         ["penalty.weight=inf", "a finite number >= 0"]),
    "batch not divisible by the data axis": (
        "multi_cos", [("batch_size", 12)],
        ["batch_size=12", "a multiple of the data axis (8 devices)"]),
    "eval batch not divisible by the data axis": (
        "multi_cos", [("eval_batch_size", 4)], ["eval_batch_size=4", "multiple of the data axis"]),
    "mesh axis not dividing the devices": (
        "multi_cos", [("mesh", (3, -1))],
        ["mesh=(3, -1)", "3 does not divide the 8 devices", "(8, 1), (4, 2)"]),
    "mesh of other size than the devices": (
        "multi_cos", [("mesh", (4, 4))], ["mesh=(4, 4)", "16 devices", "(8, 1), (4, 2)"]),
    "heads axis not dividing K": (
        "multi_cos", [("model.num_heads", 3), ("mesh", (4, 2)), ("batch_size", 16)],
        ["mesh=(4, 2)", "heads dividing model.num_heads=3", "(8, 1)"]),
    "mesh of one axis": ("multi_cos", [("mesh", (8,))], ["mesh=(8,)", "(data, heads)"]),
    "mesh of non-integers": ("multi_cos", [("mesh", (2.5, -1))], ["mesh=(2.5, -1)", "(8, 1)"]),
    "mesh of strings": ("multi_cos", [("mesh", ("(a,1)",))], ["mesh=('(a,1)',)", "(8, 1)"]),
    "image too small for the imagenet stem": (
        "multi_cos", [("dataset.image_size", 16)],
        ["dataset.image_size=16", ">= 32 for model.stem='imagenet'"]),
    "image too small for the cifar stem": (
        "multi_cos", [("model.stem", "cifar"), ("dataset.image_size", 4)],
        ["dataset.image_size=4", ">= 8 for model.stem='cifar'"]),
    "frozen head out of range": ("multi_cos", [("model.frozen_heads", (5,))],
                                 ["model.frozen_heads=(5,)", "head indices in 0..1"]),
    "negative frozen head": ("multi_cos", [("model.frozen_heads", (-1,))],
                             ["model.frozen_heads=(-1,)", "0..1"]),
    "init head out of range": ("multi_cos", [("model.init_heads", (2,))],
                               ["model.init_heads=(2,)", "head indices in 0..1"]),
    "unknown arch": ("multi_cos", [("model.arch", "resnet18")], ["model.arch='resnet18'", ARCHS]),
    "unknown penalty kind": ("multi_cos", [("penalty.kind", "cosine")],
                             ["penalty.kind='cosine'", "cos, abs, square, align"]),
    "unknown fusion": ("multi_cos", [("model.fusion", "mean")],
                       ["model.fusion='mean'", "concat, sum"]),
    "unknown classifier": ("multi_cos", [("model.classifier", "linear")],
                           ["model.classifier='linear'", "flatten_mlp, pool_linear, pool_mlp"]),
    "unknown stem": ("multi_cos", [("model.stem", "vit")], ["model.stem='vit'", "imagenet, cifar"]),
    "unknown dtype": ("multi_cos", [("model.dtype", "float64")],
                      ["model.dtype='float64'", "auto, float32, bfloat16"]),
    "float16 without loss scaling": ("multi_cos", [("model.dtype", "float16")],
                                     ["model.dtype='float16'", "auto, float32, bfloat16",
                                      "needs loss scaling"]),
    "unknown dataset": ("multi_cos", [("dataset.name", "mnist")],
                        ["dataset.name='mnist'", "digits, cifar10, caltech101"]),
    "empty split": ("multi_cos", [("dataset.eval_split", "")],
                    ["dataset.eval_split=''", "a split name"]),
    "unknown optimizer": ("multi_cos", [("optimizer.name", "adam")],
                          ["optimizer.name='adam'", "adamw, sgd"]),
    "zero learning rate": ("multi_cos", [("optimizer.learning_rate", 0.0)],
                           ["optimizer.learning_rate=0.0", "> 0"]),
    "NaN learning rate": ("multi_cos", [("optimizer.learning_rate", math.nan)],
                          ["optimizer.learning_rate=nan", "a finite number"]),
    "unknown protocol": ("multi_cos", [("protocol", "two_stage")],
                         ["protocol='two_stage'", "scratch, pretrained_head"]),
    "pretrained head without a source": ("multi_cos", [("protocol", "pretrained_head")],
                                         ["model.init_from=''", "a trained single run's workdir",
                                          "protocol='pretrained_head'"]),
    "negative init head": ("multi_cos", [("model.init_from_head", -1)],
                           ["model.init_from_head=-1", "an integer >= 0"]),
    "unknown frozen BN mode": ("multi_cos", [("model.frozen_bn", "train")],
                               ["model.frozen_bn='train'", "running, batch"]),
    "negative decay horizon": ("multi_cos", [("optimizer.decay_epochs", -1.0)],
                               ["optimizer.decay_epochs=-1.0", ">= 0"]),
    "negative stage-1 length": ("compare", [("stage1.num_epochs", -2.0)],
                                ["stage1.num_epochs=-2.0", ">= 0"]),
    "stage-1 horizon not a number": ("compare", [("stage1.decay_epochs", math.inf)],
                                     ["stage1.decay_epochs=inf", "a finite number"]),
    "negative probe size": ("multi_cos", [("analysis.probe_examples", -1)],
                            ["analysis.probe_examples=-1", "an integer >= 0"]),
    "negative probe cadence": ("multi_cos", [("analysis.probe_every_evals", -2)],
                               ["analysis.probe_every_evals=-2", "an integer >= 0"]),
    "unknown train crop": ("multi_cos", [("dataset.train_crop", "centre")],
                           ["dataset.train_crop='centre'", "random, center"]),
    "excluded class of a bad type": ("multi_cos", [("dataset.exclude_classes", (1.5,))],
                                     ["dataset.exclude_classes=(1.5,)", "class names or indices"]),
    "held-out fraction of one": ("multi_cos", [("dataset.holdout_fraction", 1.0)],
                                 ["dataset.holdout_fraction=1.0", "[0, 1)"]),
    "held-out seed beyond 64 bits": ("multi_cos", [("dataset.holdout_seed", 2**64)],
                                     ["dataset.holdout_seed=", "a 64-bit integer"]),
    "eval cadence of no epochs": ("multi_cos", [("eval_every_epochs", 0.0)],
                                  ["eval_every_epochs=0.0", "a finite number > 0"]),
    "no training length": ("multi_cos", [("num_epochs", 0.0), ("total_steps", 0)],
                           ["num_epochs=0.0", "total_steps > 0"]),
    "infinite epochs": ("multi_cos", [("num_epochs", math.inf), ("total_steps", 0)],
                        ["num_epochs=inf", "a finite number"]),
    "dropout of one": ("multi_cos", [("model.dropout", 1.0)], ["model.dropout=1.0", "[0, 1)"]),
    "two-channel mean": ("multi_cos", [("dataset.mean", (0.5, 0.5))],
                         ["dataset.mean=(0.5, 0.5)", "three finite numbers"]),
    "zero std": ("multi_cos", [("dataset.std", (0.5, 0.0, 0.5))],
                 ["dataset.std=(0.5, 0.0, 0.5)", "three numbers > 0"]),
    "seed beyond 64 bits": ("multi_cos", [("seed", 2**64)], ["seed=18446744073709551616",
                                                             "a 64-bit integer"]),
    "unknown distributed mode": ("multi_cos", [("distributed", "yes")],
                                 ["distributed='yes'", "auto, on, off"]),
    "unknown compared variant": ("compare", [("compare_variants", ("single", "multi_kos"))],
                                 ["compare_variants=('single', 'multi_kos')",
                                  "single, multi, multi_cos"]),
    "nothing to compare": ("compare", [("compare_variants", ())],
                           ["compare_variants=()", "a non-empty tuple"]),
    # The recipe fields (issue 17).
    "label smoothing of one": ("multi_cos", [("label_smoothing", 1.0)],
                               ["label_smoothing=1.0", "a number in [0, 1)"]),
    "negative clip norm": ("multi_cos", [("optimizer.clip_norm", -1.0)],
                           ["optimizer.clip_norm=-1.0", "a finite number >= 0"]),
    "EMA decay of one": ("multi_cos", [("optimizer.ema_decay", 1.0)],
                         ["optimizer.ema_decay=1.0", "[0, 1)", "0.999 is typical"]),
    "no micro-batch": ("multi_cos", [("optimizer.accum_steps", 0)],
                       ["optimizer.accum_steps=0", "an integer >= 1"]),
    "accumulation not dividing the batch": ("multi_cos", [("optimizer.accum_steps", 3)],
                                            ["optimizer.accum_steps=3", "batch_size=8"]),
    "micro-batch not dividing the devices": (
        "multi_cos", [("optimizer.accum_steps", 2)],
        ["optimizer.accum_steps=2", "batch_size / 8", "each device"]),
    "unknown train crop": ("multi_cos", [("dataset.train_crop", "inception")],
                           ["dataset.train_crop='inception'", "random_resized"]),
    "crop scale upside down": ("multi_cos", [("dataset.crop_scale", (0.9, 0.1))],
                               ["dataset.crop_scale=(0.9, 0.1)", "0 < low <= high"]),
    "crop scale beyond the image": ("multi_cos", [("dataset.crop_scale", (0.5, 2.0))],
                                    ["dataset.crop_scale=(0.5, 2.0)", "(0, 1]"]),
    "zero crop ratio": ("multi_cos", [("dataset.crop_ratio", (0.0, 1.0))],
                        ["dataset.crop_ratio=(0.0, 1.0)", "0 < low <= high"]),
    "negative mixup": ("multi_cos", [("dataset.mixup_alpha", -0.2)],
                       ["dataset.mixup_alpha=-0.2", "a finite number >= 0"]),
    "infinite cutmix": ("multi_cos", [("dataset.cutmix_alpha", math.inf)],
                        ["dataset.cutmix_alpha=inf", "a finite number >= 0"]),
    "drop path of one": ("multi_cos", [("model.drop_path", 1.0)],
                         ["model.drop_path=1.0", "a number in [0, 1)"]),
}


@pytest.mark.parametrize("case", INVALID, ids=str)
def test_an_invalid_value_is_named_with_what_is_valid(case):
  variant, overrides, parts = INVALID[case]
  assert_names(rejection(smoke_config(f"{variant},smoke", overrides)), *parts)


def test_a_batch_not_divisible_by_the_processes_is_refused():
  # A (1, 8) mesh puts every device on the heads axis, so only the process count divides.
  c = smoke_config(overrides=[("model.num_heads", 8), ("mesh", (1, -1)), ("batch_size", 9)])
  assert_names(rejection(c, NUM_DEVICES, process_count=2), "batch_size=9", "of the 2 processes")


def test_a_heads_axis_across_hosts_is_refused():
  # 8 devices in 4 processes of 2: a heads axis of 4 would share a data shard across processes.
  c = smoke_config(overrides=[("model.num_heads", 4), ("mesh", (2, 4))])
  configlib.validate(c, NUM_DEVICES, 1)  # one process: fine
  assert_names(rejection(c, NUM_DEVICES, process_count=4), "mesh=(2, 4)",
               "a heads axis within one host", "processes of 2 devices", "heads dividing 2")
  configlib.validate(smoke_config(overrides=[("model.num_heads", 4), ("mesh", (4, 2))]),
                     NUM_DEVICES, 4)


def test_every_config_file_and_variant_is_valid():
  for path in sorted((ROOT / "configs").glob("*.py")):
    for arg in (None, configlib.COMPARE, *configlib.VARIANTS):
      for smoke in ("", ",smoke"):
        configlib.validate(configlib.load_config_file(path, f"{arg or ''}{smoke}"), NUM_DEVICES, 1)


# --- configlib.override: the type and name mistakes --------------------------------------------


@pytest.mark.parametrize("field,value,parts", [
    ("model.num_heads", "two", ["model.num_heads='two'", "wrong type (str)", "an integer"]),
    ("model.num_heads", 2.5, ["model.num_heads=2.5", "wrong type (float)", "an integer"]),
    ("model.arch", 18, ["model.arch=18", "wrong type (int)", "a string"]),
    ("mesh", "(2,4)", ["mesh='(2,4)'", "wrong type (str)", "a tuple"]),
    ("model.frozen_heads", 0, ["model.frozen_heads=0", "a tuple"]),
    ("dataset.flip", 1, ["dataset.flip=1", "True or False"]),
    ("optimizer.learning_rate", "1e-3", ["optimizer.learning_rate='1e-3'", "a number"]),
    ("model.num_head", 2, ["'model.num_head'", "valid fields of model:", "num_heads"]),
    ("keep_best", 1, ["keep_best=1", "True or False"]),
    ("dataset.grayscale", "L", ["dataset.grayscale='L'", "True or False"]),
    ("modle.num_heads", 2, ["'modle.num_heads'", "valid top-level fields:", "model"]),
    ("model.arch.depth", 2, ["'model.arch.depth'", "model.arch is a value"]),
])
def test_override_turns_type_and_name_mistakes_into_config_errors(field, value, parts):
  with pytest.raises(configlib.ConfigError) as e:
    configlib.override(smoke_config(), field, value)
  assert_names(str(e.value), *parts)


# --- init_from -----------------------------------------------------------------------------


def write_timm_file(path, arch, num_classes, stem="imagenet"):
  """A timm-layout state dict of `arch` (zeros: only names and shapes matter here)."""
  model = models.create_model(arch, num_classes, stem=stem)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  state = {}
  for keys, leaf in jax.tree.leaves_with_path(
      {c: shapes[c] for c in ("params", "batch_stats")}):
    name = timm_import.torch_key(tuple(k.key for k in keys[1:]))  # keys[0] is the collection
    shape = timm_import._to_torch_shape(leaf.shape, name)  # pylint: disable=protected-access
    state[name] = np.zeros(shape, np.float32)
  save_file(state, str(path))
  return str(path)


def init_from_config(path, arch="seresnet_tiny", stem="imagenet"):
  return smoke_config(overrides=[("model.init_from", str(path)), ("model.arch", arch),
                                 ("model.stem", stem)])


def test_init_from_of_another_arch_is_refused():
  # tiny_basic is a BasicBlock model; the bottleneck arch has other keys and shapes.
  path = str(FIXTURES / "tiny_basic.safetensors")
  assert_names(rejection(init_from_config(path, "seresnet_tiny_bottleneck")),
               f"model.init_from={path!r}", "does not fit model.arch='seresnet_tiny_bottleneck'",
               "missing keys: layer1.0.bn3",
               "valid: the weights of a timm seresnet_tiny_bottleneck")


def test_init_from_of_another_stem_is_refused(tmp_path):
  path = write_timm_file(tmp_path / "cifar_stem.safetensors", "seresnet_tiny", 10, stem="cifar")
  assert_names(rejection(init_from_config(path)), "model.init_from=",
               "with model.stem='imagenet'", "conv1.weight: file has (8, 3, 3, 3)")


@pytest.mark.parametrize("name,content,parts", [
    ("missing.safetensors", None, ["an existing .safetensors or .npz file"]),
    ("damaged.safetensors", b"hello", ["could not be read (SafetensorError"]),
    ("damaged.npz", b"PK\x03\x04 truncated", ["could not be read (BadZipFile"]),
    ("weights.pt", b"torch pickle", ["could not be read", "expected a .safetensors or .npz"]),
])
def test_an_unreadable_init_from_is_refused(tmp_path, name, content, parts):
  path = tmp_path / name
  if content is not None:
    path.write_bytes(content)
  assert_names(rejection(init_from_config(path)), f"model.init_from={str(path)!r}", *parts)


def test_init_from_class_count_is_free(tmp_path):
  """What is validated: names and shapes of every backbone tensor, for model.arch / model.stem.

  Not validated: the class count. The heads are feature extractors (`place_head` drops `fc`),
  so a timm model trained on any number of classes -- or saved without its `fc` -- fits any
  data set; only an `fc` whose input width does not match the arch is refused (a wrong arch).
  """
  for classes in (7, 1000, 0):  # 0: no fc in the file at all
    path = write_timm_file(tmp_path / f"tiny_{classes}.safetensors", "seresnet_tiny", classes)
    configlib.validate(init_from_config(path), NUM_DEVICES, 1)
  state = load_file(path)
  state.update({"fc.weight": np.zeros((7, 99), np.float32), "fc.bias": np.zeros(7, np.float32)})
  save_file(state, path)
  assert_names(rejection(init_from_config(path)), "does not fit model.arch='seresnet_tiny'",
               "fc.weight: file has (7, 99), seresnet_tiny needs (7, 64)")


# --- splits: refused by the data layer when the data set opens --------------------------------


def test_an_unknown_split_is_refused_when_the_data_set_opens(digits_dir):
  for field in ("train_split", "eval_split"):
    c = smoke_config(overrides=[("dataset.data_dir", digits_dir), (f"dataset.{field}", "dev")])
    configlib.validate(c, NUM_DEVICES, 1)  # any non-empty name could exist: the data set decides
    with pytest.raises(data.DatasetError) as e:
      data.dataset_info(c.dataset)
    assert_names(str(e.value), f"dataset.{field}='dev'", "available splits: train, test")


# --- the command line: exit status 1, one line, no traceback, the workdir untouched -----------

OLD = 1_000_000_000  # an mtime in 2001: whatever touches the workdir shows


@pytest.fixture(params=["existing_workdir", "new_workdir"])
def workdir(request, tmp_path):
  path = tmp_path / "run"
  if request.param == "existing_workdir":  # an earlier run's results, which must survive
    path.mkdir()
    (path / "MARKER").write_text("keep me")
    (path / "results.json").write_text(json.dumps({"finished": True, "history": []}))
    for p in (path / "MARKER", path / "results.json", path):
      os.utime(p, (OLD, OLD))
  return path


def snapshot(path):
  """Every entry under `path`, itself included, with size and mtime; None if it is absent."""
  if not path.exists():
    return None
  return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns, p.stat().st_size)
                for p in [path, *path.rglob("*")])


@pytest.fixture(scope="module")
def bad_image_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  for split in ("train", "test"):
    for cls in ("a", "b"):
      os.makedirs(root / split / cls)
      tf.io.write_file(str(root / split / cls / "0.png"),
                       tf.io.encode_png(tf.zeros([32, 32, 3], tf.uint8)))
  (root / "train" / "b" / "x.jpg").write_text("a text file, not a JPEG")
  return str(root)


# (config argument, extra flags, what the error line must contain); {digits}, {fixtures} and
# {images} are filled in by the test.
CLI = {
    "wrong type": ("multi_cos,smoke", ["--config.model.num_heads=two"],
                   ["--config.model.num_heads='two'", "wrong type", "valid: an integer"]),
    "unknown variant": ("multi_kos,smoke", [],
                        ["--config=configs/digits.py", "'multi_kos'",
                         "valid: single, multi, multi_cos, compare"]),
    "unknown field": ("multi_cos,smoke", ["--config.model.num_head=3"],
                      ["--config.model.num_head", "unknown config field",
                       "valid fields of model:", "num_heads"]),
    "frozen head out of range": ("multi_cos,smoke", ["--config.model.frozen_heads=(5,)"],
                                 ["model.frozen_heads=(5,)", "head indices in 0..1"]),
    "penalty on one head": ("single,smoke", ["--config.penalty.weight=1.0"],
                            ["penalty.weight=1.0", "num_heads >= 2"]),
    "EMA decay above one": ("multi_cos,smoke", ["--config.optimizer.ema_decay=1.5"],
                            ["optimizer.ema_decay=1.5", "a number in [0, 1)"]),
    "mesh not dividing the devices": ("multi_cos,smoke", ["--config.mesh=(3,-1)"],
                                      ["mesh=(3, -1)", "8 devices", "(8, 1), (4, 2)"]),
    "mesh not numbers": ("multi_cos,smoke", ["--config.mesh=(a,1)"],
                         ["mesh=('(a,1)',)", "(8, 1), (4, 2)"]),
    "image too small": ("multi_cos,smoke", ["--config.dataset.image_size=16"],
                        ["dataset.image_size=16", ">= 32 for model.stem='imagenet'"]),
    # The comparison itself is valid (two heads split over a heads axis of 2); its `single`
    # variant, one head, is not: only the per-variant check catches it.
    "a later compared variant": (
        "compare,smoke", ["--config.mesh=(4,2)"],
        ["mesh=(4, 2)", "heads dividing model.num_heads=1"]),
    "init_from of another arch": (
        "multi_cos,smoke", ["--config.model.arch=seresnet_tiny_bottleneck",
                            "--config.model.init_from={fixtures}/tiny_basic.safetensors"],
        ["model.init_from=", "tiny_basic.safetensors", "seresnet_tiny_bottleneck"]),
    "unknown protocol": ("compare,smoke", ["--config.protocol=notebooks"],
                         ["protocol='notebooks'", "scratch, pretrained_head"]),
    "negative stage-1 length": ("compare,smoke", ["--config.stage1.num_epochs=-1"],
                                ["stage1.num_epochs=-1", ">= 0"]),
    "a recipe word the config lacks": ("compare,paper,smoke", [],
                                       ["unknown config argument 'paper'", "smoke"]),
    "a pretrained head that is no run": (
        "multi_cos,smoke", ["--config.protocol=pretrained_head",
                            "--config.model.init_from={digits}"],
        ["model.init_from=", "holds no featdiv run (no config.json)"]),
    "unknown split": ("multi_cos,smoke", ["--config.dataset.eval_split=validation"],
                      ["dataset.eval_split='validation'", "available splits: train, test"]),
    "non-image in the image folder": (
        "multi_cos,smoke", ["--config.dataset.name=imagefolder",
                            "--config.dataset.data_dir={images}"],
        ["{images}/train/b/x.jpg", "is not an image", "BMP/GIF/JPEG/PNG"]),
}


@pytest.mark.parametrize("case", CLI, ids=str)
def test_main_refuses_bad_input_with_one_line_and_leaves_the_workdir(case, workdir, digits_dir,
                                                                     bad_image_folder, capsys):
  arg, flags, parts = CLI[case]
  paths = dict(digits=digits_dir, fixtures=FIXTURES, images=bad_image_folder)
  before = snapshot(workdir)
  rc = main.main(["main", f"--config=configs/digits.py:{arg}",
                  f"--config.dataset.data_dir={digits_dir}",
                  *[f.format(**paths) for f in flags], f"--workdir={workdir}"])
  err = capsys.readouterr().err
  assert rc == 1
  errors = [l for l in err.splitlines() if l.startswith("featdiv_jax: error:")]
  assert len(errors) == 1, err
  assert_names(errors[0], *[p.format(**paths) for p in parts])
  assert "Traceback" not in err
  assert snapshot(workdir) == before


# Mistakes main must catch before it touches jax.distributed or expands a comparison.
MAIN_GAPS = {
    # maybe_initialize_distributed runs before validate and starts jax.distributed for any mode
    # but auto / off.
    "unknown distributed mode": ("multi_cos,smoke", ["--config.distributed=bogus"],
                                 "distributed='bogus'"),
    # variants() calls with_variant, whose ValueError is not a user error, before validate.
    "unknown compared variant": ("compare,smoke", ["--config.compare_variants=(single,bogus)"],
                                 "compare_variants="),
    # Only the compared variants are validated, and none is: nothing runs, exit status 0.
    "nothing to compare": ("compare,smoke", ["--config.compare_variants=()"],
                           "compare_variants=()"),
}


def test_a_comparison_is_refused_for_a_variant_that_cannot_run():
  # Two heads over a heads axis of 2 are valid; the comparison's one-head `single` is not.
  config = smoke_config("compare,smoke", [("mesh", (4, 2))])
  configlib.validate(config, NUM_DEVICES, 1)
  with pytest.raises(configlib.ConfigError) as e:
    configlib.validated_runs(config, NUM_DEVICES, 1)
  assert_names(str(e.value), "mesh=(4, 2)", "heads dividing model.num_heads=1")


@pytest.mark.parametrize("case", MAIN_GAPS, ids=str)
def test_main_gaps(case, tmp_path, capsys):
  arg, flags, part = MAIN_GAPS[case]
  rc = main.main(["main", f"--config=configs/digits.py:{arg}", *flags,
                  f"--config.dataset.data_dir={tmp_path / 'tfds'}",
                  f"--workdir={tmp_path / 'run'}"])
  assert rc == 1 and part in capsys.readouterr().err


# --- property: random overrides are accepted and train, or are refused by name --------------

NAN, INF = math.nan, math.inf
# Valid values, out-of-range values and wrong types for each field. Kept small and fast: tiny
# archs, images <= 48 pixels, batches <= 16.
# (valid values, invalid values or wrong types) per field. Kept small and fast: tiny archs,
# images <= 48 pixels, batches <= 16. Valid values are drawn three times as often as invalid
# ones, so about half the override sets are accepted and train (the rest are refused by name);
# `--hypothesis-show-statistics` shows the share.
OVERRIDES = {
    "model.num_heads": ([3, 4, 2, 1], [0, -1, "two", 2.5]),
    "model.arch": (["seresnet_tiny_bottleneck", "seresnet_tiny"], ["resnet9", 18]),
    "model.stem": (["cifar", "imagenet"], ["vit"]),
    "model.fusion": (["sum", "concat"], ["mean"]),
    "model.classifier": (["pool_mlp", "pool_linear", "flatten_mlp"], ["svm"]),
    "model.dtype": (["bfloat16", "float32"], ["float64", 32]),
    "model.frozen_heads": ([(0,), (1,), (), (0, 1)], [(-1,), (4,), 1, ("0",)]),
    "model.dropout": ([0.3, 0.0], [1.0, -0.1, NAN, "half"]),
    "penalty.weight": ([2.0, 0.0, 0.5], [-1.0, INF, NAN, "1"]),
    "penalty.kind": (["align", "abs", "square", "cos", "cka"], ["l2"]),
    "batch_size": ([16, 8], [0, 4, 12, "8", 8.0]),
    "mesh": ([(2, 4), (4, 2), (1, 8), (-1, 1)],
             [(3, -1), (4, 4), (8,), (-1, -1), (2.5, -1), ("a", 1), "(2,4)"]),
    "dataset.image_size": ([48, 32], [8, 16, 0, 7, 33.0, "32"]),  # 8, 16: the imagenet stem's
    "optimizer.name": (["sgd", "adamw"], ["adam"]),
    "optimizer.learning_rate": ([0.1, 1e-3], [0.0, -1.0, NAN, INF, "fast"]),
}


@st.composite
def override_sets(draw):
  fields = draw(st.lists(st.sampled_from(sorted(OVERRIDES)), min_size=1, max_size=4,
                         unique=True))
  overrides = []
  for field in fields:
    valid, invalid = OVERRIDES[field]
    pick_valid = draw(st.sampled_from([True, True, True, False]))
    overrides.append((field, draw(st.sampled_from(valid if pick_valid else invalid))))
  return overrides


def smoke_step(config) -> float:
  """One real train step of `config` on the 8 devices, as train.py sets it up (random data)."""
  trainer = steps.make_trainer(config, 10, sharding.make_mesh(config.mesh), total_steps=10)
  state, train, batch_sh = (trainer.init_state(jax.random.key(0)), trainer.train_step,
                            trainer.batch_sharding)
  rng = np.random.default_rng(0)
  size, batch = config.dataset.image_size, config.batch_size
  local = {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
           "label": rng.integers(0, 10, size=batch).astype(np.int32)}
  _, metrics = train(state, sharding.global_batch(local, batch_sh))
  return float(metrics["loss"])


@pytest.fixture(scope="module")
def fast_compiles():
  # Compiling is most of a smoke step on 2 CPU cores; less optimised code computes the same
  # step, in less time (docs/performance.md, "Figures behind code comments").
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@hypothesis.settings(max_examples=6, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(overrides=override_sets())
# Always tried as well: what the random draws may miss -- 3 and 4 heads split over a heads axis,
# the bottleneck block, SGD, bfloat16 and a frozen head.
@hypothesis.example(overrides=[("model.num_heads", 4), ("mesh", (2, 4)),
                               ("model.frozen_heads", (0,)), ("optimizer.name", "sgd")])
@hypothesis.example(overrides=[("model.arch", "seresnet_tiny_bottleneck"),
                               ("model.dtype", "bfloat16"), ("model.num_heads", 3),
                               ("model.frozen_heads", (2,))])
def test_random_overrides_train_or_are_refused_by_name(fast_compiles, overrides):
  config = smoke_config()
  try:
    for field, value in overrides:
      configlib.override(config, field, value)
    configlib.validate(config, NUM_DEVICES, 1)
  except configlib.ConfigError as e:  # any other exception fails the test
    named = [f for f, _ in overrides]
    assert any(f in str(e) or f.rsplit(".", 1)[-1] in str(e) for f in named), (overrides, e)
    hypothesis.event("refused")  # --hypothesis-show-statistics counts both outcomes
    return
  hypothesis.event("accepted and trained")
  assert np.isfinite(smoke_step(config)), overrides


# --- a featdiv run as model.init_from ---------------------------------------------------------


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, digits_dir):
  """A finished tiny `single` run: a source of pretrained heads."""
  workdir = str(tmp_path_factory.mktemp("single"))
  train.train_and_evaluate(smoke_config("single,smoke", [("dataset.data_dir", digits_dir)]),
                           workdir)
  return workdir


@pytest.mark.parametrize("spec,overrides,parts", [
    ("{run}", [("model.arch", "seresnet_tiny_bottleneck")],
     ["holds a run of model.arch='seresnet_tiny'", "valid: a run of model.arch="
      "'seresnet_tiny_bottleneck'"]),
    ("{run}", [("model.stem", "cifar")], ["with model.stem='imagenet'", "model.stem='cifar'"]),
    ("{run}", [("model.init_from_head", 1)],
     ["model.init_from_head=1", "valid: 0..0", "has 1 head(s)"]),
    ("{run}@5", [], ["no checkpoint of step 5", "checkpoints: 3, 6"]),
    ("{run}@first", [], ["step 'first' is not one of latest, best or a step number"]),
    ("{empty}", [], ["holds no featdiv run (no config.json)"]),
])
def test_a_run_as_init_from_is_checked(single_run, tmp_path, spec, overrides, parts):
  spec = spec.format(run=single_run, empty=tmp_path)
  config = smoke_config(overrides=[("model.init_from", spec), *overrides])
  assert_names(rejection(config), f"model.init_from={spec!r}" if "head" not in parts[0] else "",
               *parts)


def test_a_run_as_init_from_is_accepted(single_run):
  for spec in (single_run, f"{single_run}@best", f"{single_run}@6"):
    configlib.validate(smoke_config(overrides=[("model.init_from", spec)]), NUM_DEVICES, 1)
