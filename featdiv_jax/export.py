r"""Export one head of a run as a timm state dict: `python -m featdiv_jax.export`.

  python -m featdiv_jax.export --workdir W [--head K] [--step latest|best|N] --out F.safetensors

Writes head K (default 0) of the run in W at checkpoint `--step` (default: the latest) as the
state dict of timm's `seresnetXX` of the run's `model.arch`: timm's names (`conv1.weight`,
`bn1.running_mean`, `layer1.0.se.fc1.weight`, `layer2.0.downsample.0.weight`, ...), torch layouts
(conv kernels OIHW, linear weights (out, in), SE 1x1 convs (out, in, 1, 1)) and each
BatchNorm's `num_batches_tracked` (the run's step). The values are the checkpoint's, bit for
bit: `featdiv_jax.models.load_timm_weights(F, arch, stem=...)` gives back the head's variables.

- A `single` run (one head, `pool_linear` classifier) is exactly a timm model: its `fc` is
  exported as `fc.weight` / `fc.bias`, and `timm.create_model(arch, num_classes=N)` loads F
  with `strict=True` and computes the run's logits.
- A multi-head run has no per-head classifier (its heads are fused, then classified): the
  backbone alone is exported, for `timm.create_model(arch, num_classes=0)` (pooled features),
  or as `model.init_from` of another run.

Stock timm has these models only for the `imagenet` stem and the archs seresnet18/34/50/101/152;
a `cifar`-stem run (3x3 stride-1 conv1, no max-pool) or a `seresnet_tiny*` test model is exported
all the same but fits only this project's models (`load_timm_weights(F, arch, stem="cifar")`).

Checking against timm by hand (torch and timm are not dependencies of this project; install
them in a separate environment as tests/fixtures/make_timm_fixture.py describes):

  import numpy as np, timm, torch
  from safetensors.torch import load_file
  model = timm.create_model("seresnet18", num_classes=N)   # num_classes=0 for a multi-head run
  model.load_state_dict(load_file("F.safetensors"), strict=True)
  model.eval()
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)   # NHWC
  out = model(torch.from_numpy(x).permute(0, 3, 1, 2)).detach().numpy()
  # compare with this project's logits (single) or pooled features (multi-head), e.g.
  #   variables = featdiv_jax.models.load_timm_weights("F.safetensors", "seresnet18")
  #   featdiv_jax.models.create_model("seresnet18", N).apply(variables, x)
  # (for num_classes=0 timm returns the pooled features: the mean over H, W of the feature map
  # that create_model("seresnet18", 0) returns); they agree to about 1e-6 of their magnitude.

A mistake (no such workdir, no checkpoint, an unknown step, a head out of range, an output that
is not a .safetensors file) is one line `featdiv_jax: error: ...`, exit status 1, nothing
written. Needs no TensorFlow and no data.
"""

import argparse
import os
import sys

if __name__ == "__main__":  # `python -m featdiv_jax.export`: before any library starts a thread
  from featdiv_jax import hostmem
  hostmem.at_entry_point()

# pylint: disable=wrong-import-position
import numpy as np  # noqa: E402
import safetensors.numpy

from featdiv_jax import runs
from featdiv_jax.cli import ToolParser as _Parser, UsageError, run_tool
from featdiv_jax.models import timm_import

PROG = "python -m featdiv_jax.export"


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog=PROG, description="Export one head of a featdiv run as a timm state dict.")
  p.add_argument("--workdir", required=True, help="the run's workdir (holds config.json)")
  p.add_argument("--head", type=int, default=0, help="which head (default 0)")
  p.add_argument("--step", default="latest",
                 help="checkpoint: latest (default), best (results.json's best eval step) or "
                      "a step number")
  p.add_argument("--out", required=True, help="the .safetensors file to write")
  return p


def has_timm_classifier(config) -> bool:
  """Whether the run is one timm model: one head whose pooled features one linear layer
  classifies (the `single` variant)."""
  return config.model.num_heads == 1 and config.model.classifier == "pool_linear"


def head_state_dict(run: runs.SavedRun, head: int) -> dict:
  """Head `head` of `run` as a timm state dict, with `fc.*` for a `single` run."""
  variables = runs.head_variables(run, head)
  if has_timm_classifier(run.config):
    variables["params"] = dict(variables["params"], fc=run.state["params"]["fc"])
  return timm_import.to_timm_state_dict(variables, num_batches_tracked=run.step)


def export(workdir: str, head: int, which: str, out: str) -> dict:
  """Writes head `head` of the run in `workdir` at checkpoint `which` to `out`; returns what
  the printed line says. Raises RunError or UsageError, before writing anything."""
  out = os.path.abspath(out)
  if not out.endswith(".safetensors"):
    raise UsageError(f"--out {out}: expected a .safetensors file")
  if not os.path.isdir(os.path.dirname(out)):
    raise UsageError(f"--out {out}: directory {os.path.dirname(out)} does not exist")
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise runs.RunError(f"{workdir} does not exist")
  num_heads = runs.read_config(workdir).model.num_heads
  if not 0 <= head < num_heads:  # before reading any array
    raise runs.RunError(f"head {head} is out of range: the run in {workdir} has {num_heads} "
                        f"head(s) (0..{num_heads - 1})")
  run = runs.load(workdir, which)
  state = head_state_dict(run, head)
  num_classes = int(state["fc.weight"].shape[0]) if "fc.weight" in state else 0
  m = run.config.model
  metadata = {"format": "pt", "featdiv_workdir": run.workdir, "featdiv_step": str(run.step),
              "featdiv_head": str(head), "arch": m.arch, "stem": m.stem,
              "num_classes": str(num_classes)}
  tmp = f"{out}.tmp.{os.getpid()}"
  try:
    safetensors.numpy.save_file(state, tmp, metadata=metadata)
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return dict(out=out, workdir=run.workdir, step=run.step, head=head, arch=m.arch, stem=m.stem,
              num_classes=num_classes, num_tensors=len(state),
              num_params=int(sum(np.size(v) for k, v in state.items()
                                 if not k.endswith(("running_mean", "running_var",
                                                    "num_batches_tracked")))))


def summary_line(r: dict) -> str:
  fits = (f"timm {r['arch']}, num_classes={r['num_classes']}" if r["num_classes"]
          else f"timm {r['arch']} backbone, num_classes=0")
  stem = "" if r["stem"] == "imagenet" else f", stem={r['stem']}"
  return (f"head {r['head']} of {r['workdir']} at step {r['step']} ({fits}{stem}; "
          f"{r['num_tensors']} tensors, {r['num_params']:,} parameters) -> {r['out']}")


def main(argv) -> int:
  """`argv` without the program name; returns the exit status (0, or 1 for a mistake)."""
  def action(args):
    return summary_line(export(args.workdir, args.head, args.step, args.out))
  return run_tool(argv, parser(), action, (UsageError, runs.RunError))


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
