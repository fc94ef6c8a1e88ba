"""Config files, the `file.py:arg` parser and the three variants."""

import importlib.util
import math
import pathlib

import pytest

from featdiv_jax import configlib, optim

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.py"))


def load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_four_configs_exist():
  assert {p.stem for p in CONFIGS} >= {"digits", "cifar10", "caltech101", "flowers102"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("arg", [None, "single", "multi", "multi_cos", "compare",
                                 "multi_cos,arch=seresnet34,heads=3", "single,smoke",
                                 "smoke", "multi,seed=3,epochs=2.5,batch=16,weight=0.5,kind=abs"])
def test_every_config_and_variant_parses(path, arg):
  module = load(path)
  assert path.stem in module.__doc__ or "python -m featdiv_jax.main" in module.__doc__
  c = module.get_config(arg)
  assert c.variant in configlib.VARIANTS + (configlib.COMPARE,)
  if c.variant == "single":
    assert (c.model.num_heads, c.model.classifier, c.penalty.weight) == (1, "pool_linear", 0.0)
  elif c.variant == "multi":
    assert c.model.num_heads >= 2 and c.penalty.weight == 0.0
  elif c.variant == "multi_cos":
    assert c.model.num_heads >= 2 and c.penalty.weight > 0
  if arg and "smoke" in arg:
    assert c.smoke and c.model.arch == "seresnet_tiny" and c.total_steps <= 10
    assert c.dataset.image_size <= 32


def test_docstrings_show_the_launch_command():
  for path in CONFIGS:
    assert f"--config=configs/{path.name}" in load(path).__doc__


def test_defaults_follow_the_papers_readme():
  c = load(CONFIGS[[p.stem for p in CONFIGS].index("caltech101")]).get_config("multi_cos")
  assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.weight_decay) == (
      "adamw", 4e-4, 5e-4)
  assert (c.num_epochs, c.batch_size, c.optimizer.schedule) == (30.0, 64, "cosine")
  assert (c.model.arch, c.model.num_heads, c.model.classifier) == ("seresnet18", 2, "flatten_mlp")
  assert (c.penalty.weight, c.penalty.kind) == (1.0, "cos")
  # What the benchmark measured fastest (docs/performance.md): bf16 compute on accelerators,
  # im2col convolutions on CPU, vmapped heads.
  assert (c.model.dtype, c.model.conv_impl) == ("auto", "auto")
  assert (c.dataset.resize_size, c.dataset.image_size, c.dataset.flip) == (256, 224, True)
  cifar = load(CONFIGS[[p.stem for p in CONFIGS].index("cifar10")]).get_config(None)
  assert (cifar.dataset.image_size, cifar.model.stem, cifar.dataset.pad) == (32, "cifar", 4)
  flowers = load(CONFIGS[[p.stem for p in CONFIGS].index("flowers102")]).get_config(None)
  assert flowers.dataset.eval_split == "validation"
  digits = load(CONFIGS[[p.stem for p in CONFIGS].index("digits")]).get_config(None)
  assert digits.variant == "compare" and digits.dataset.name == "digits"


def test_short_keys_set_their_fields():
  c = configlib.apply_arg(configlib.default_config(),
                          "multi_cos,arch=seresnet34,heads=3,steps=7,lr=0.1,dtype=bfloat16")
  assert (c.model.arch, c.model.num_heads, c.total_steps) == ("seresnet34", 3, 7)
  assert (c.optimizer.learning_rate, c.model.dtype) == (0.1, "bfloat16")


@pytest.mark.parametrize("arg,match", [
    ("multi_kos", r"unknown variant 'multi_kos'; valid: single, multi, multi_cos, compare"),
    ("multi,depth=3", r"unknown config argument 'depth=3'.*arch, heads"),
    ("multi,heads=two", r"heads='two': expected int"),
    ("multi,huge", r"unknown config argument 'huge'"),
])
def test_bad_args_name_the_value_and_the_valid_ones(arg, match):
  with pytest.raises(ValueError, match=match):
    configlib.apply_arg(configlib.default_config(), arg)


def config_of(stem, arg):
  return load(CONFIGS[[p.stem for p in CONFIGS].index(stem)]).get_config(arg)


@pytest.mark.parametrize("stem,hidden,batch,epochs,horizon,stage1", [
    ("cifar10", 256, 128, 30, 200, 30), ("caltech101", 512, 32, 45, 30, 20),
    ("flowers102", 512, 32, 30, 200, 30)])
def test_paper_word_sets_the_notebooks_two_stage_recipe(stem, hidden, batch, epochs, horizon,
                                                        stage1, tmp_path):
  """`configs/X.py:compare,paper` is the published experiment (docs/reference.md)."""
  c = config_of(stem, "compare,paper")
  assert (c.variant, c.protocol, c.keep_best) == ("compare", "pretrained_head", True)
  assert (c.model.fusion, c.model.hidden, c.model.dropout) == ("sum", hidden, 0.0)
  assert (c.batch_size, c.num_epochs, c.optimizer.decay_epochs) == (batch, epochs, horizon)
  assert c.optimizer.per_epoch and c.dataset.train_crop == "center"
  runs = dict(configlib.validated_runs(c, 1, 1, str(tmp_path)))
  assert list(runs) == ["single", "multi", "multi_cos"]
  first = runs["single"]  # stage 1: from scratch, for its own epochs, decaying over them
  assert (first.model.num_heads, first.model.init_from, first.model.frozen_heads) == (1, "", ())
  assert (first.num_epochs, first.optimizer.decay_epochs) == (stage1, stage1)
  for variant in ("multi", "multi_cos"):  # stage 2: head 0 is stage 1's, frozen in train mode
    second = runs[variant]
    assert second.model.init_from == str(tmp_path / "single")
    assert (second.model.frozen_heads, second.model.frozen_bn) == ((0,), "batch")
    assert (second.num_epochs, second.optimizer.decay_epochs) == (epochs, horizon)
  assert runs["multi"].penalty.weight == 0.0 and runs["multi_cos"].penalty.weight == 1.0
  if stem == "caltech101":
    assert c.dataset.grayscale and c.dataset.exclude_classes == ("background_google",)
    assert c.dataset.holdout_fraction == 0.1
  if stem == "cifar10":
    assert (c.model.stem, c.dataset.pad, c.dataset.std) == (
        "imagenet", 0, (0.2023, 0.1994, 0.2010))


def test_words_apply_before_the_key_values_wherever_they_stand():
  for arg in ("compare,paper,batch=64,smoke", "compare,batch=64,smoke,paper"):
    c = config_of("flowers102", arg)
    assert (c.batch_size, c.model.arch, c.model.hidden) == (64, "seresnet_tiny", 32), arg
    assert c.protocol == "pretrained_head" and c.dataset.image_size == 32, arg
  c = configlib.apply_arg(configlib.default_config(),
                          "single,steps=3,smoke,protocol=pretrained_head")
  assert (c.total_steps, c.protocol) == (3, "pretrained_head")


def test_a_config_without_a_paper_recipe_refuses_the_word():
  with pytest.raises(configlib.ConfigError, match=r"unknown config argument 'paper'.*smoke"):
    config_of("digits", "compare,paper")


def test_with_variant_copies_and_keeps_user_heads():
  c = configlib.apply_arg(configlib.default_config(), "compare,heads=3,weight=0.3")
  multi = configlib.with_variant(c, "multi")
  cos = configlib.with_variant(c, "multi_cos")
  single = configlib.with_variant(c, "single")
  assert (multi.model.num_heads, multi.penalty.weight) == (3, 0.0)
  assert (cos.model.num_heads, cos.penalty.weight) == (3, 0.3)
  assert single.model.num_heads == 1 and c.model.num_heads == 3  # the original is untouched


def test_the_notebooks_cosine_horizon_and_per_epoch_steps():
  """torch's CosineAnnealingLR(T_max) stepped per epoch, as the paper's notebooks use it."""
  c = configlib.default_config().optimizer
  c.learning_rate, c.decay_epochs, c.per_epoch = 4e-4, 30.0, True
  lr = optim.learning_rate_schedule(c, total_steps=45 * 10, steps_per_epoch=10)
  torch_lr = lambda epoch: 4e-4 * 0.5 * (1 + math.cos(math.pi * epoch / 30))
  for step in (0, 9, 10, 155, 299, 300, 449):
    assert float(lr(step)) == pytest.approx(torch_lr(step // 10), rel=1e-5), step
  assert float(lr(449)) > float(lr(300))  # past T_max the cosine rises again, as in torch
  c.per_epoch = False
  lr = optim.learning_rate_schedule(c, total_steps=450, steps_per_epoch=10)
  assert float(lr(155)) == pytest.approx(4e-4 * 0.5 * (1 + math.cos(math.pi * 15.5 / 30)))
  c.decay_epochs = 0.0  # the default: decay to 0 over the run
  lr = optim.learning_rate_schedule(c, total_steps=450, steps_per_epoch=10)
  assert float(lr(450)) == pytest.approx(0.0, abs=1e-12)
  with pytest.raises(ValueError, match="need the epoch length"):
    c.per_epoch = True
    optim.learning_rate_schedule(c, total_steps=450)
