r"""Evaluate a run's checkpoint on a split: `python -m featdiv_jax.evaluate --workdir=W`.

  python -m featdiv_jax.evaluate --workdir W [--split S] [--step latest|best|N] [--batch B]

Restores the model of the run in W (its config.json) at checkpoint `--step` (default: the
latest; `best` is results.json's best eval step, kept with `keep_best=True`), evaluates it on
split S of the run's data set (default: the config's `dataset.eval_split`), writes
W/eval_<S>_<step>.json and prints one line. The numbers are those of the training loop's own
evaluation (`evaluation.evaluate_split` with the same compiled eval step, mesh and batch size): at a
finished run's last step they equal results.json's `final_eval_accuracy` and its last
`eval_loss` exactly. `--batch` changes only the loss's last bits (the summation order).

One process (no jax.distributed). The run's recorded mesh is used when it fits this machine's
devices, else all devices on the `data` axis (the same numbers up to the summation order).
A mistake (no such workdir, no checkpoint, an unknown step or split) is one line
`featdiv_jax: error: ...` on stderr, exit status 1, and nothing is written.
"""

import argparse
import os
import re
import sys

if __name__ == "__main__":  # `python -m featdiv_jax.evaluate`: before any library starts a thread
  from featdiv_jax import hostmem
  hostmem.at_entry_point()

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import ml_collections

from featdiv_jax import checkpoint, configlib, data, evaluation, runs, sharding, steps
from featdiv_jax.cli import ToolParser as _Parser, UsageError, run_tool
from featdiv_jax.files import write_json_atomic

PROG = "python -m featdiv_jax.evaluate"


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog=PROG, description="Evaluate a featdiv run's checkpoint on a split.")
  p.add_argument("--workdir", required=True, help="the run's workdir (holds config.json)")
  p.add_argument("--split", default=None,
                 help="split of the run's data set (default: its dataset.eval_split)")
  p.add_argument("--step", default="latest",
                 help="checkpoint: latest (default), best (results.json's best eval step) or "
                      "a step number")
  p.add_argument("--batch", type=int, default=None,
                 help="global eval batch size (default: the run's eval_batch_size or "
                      "batch_size)")
  p.add_argument("--probe-examples", type=int, default=0, metavar="N",
                 help="also fit the heads' linear probes on about N training examples "
                      "(default 0: none; training runs them at their last evaluation)")
  return p


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A recorded config with any field newer than its run at its default (as workdir.check
  counts such a field)."""
  def merge(default, recorded):
    out = dict(default)
    for k, v in recorded.items():
      out[k] = merge(default[k], v) if isinstance(v, dict) and isinstance(
          default.get(k), dict) else v
    return out
  return ml_collections.ConfigDict(merge(configlib.default_config().to_dict(),
                                         config.to_dict()))


def output_path(workdir: str, split: str, step: int) -> str:
  """W/eval_<split>_<step>.json; characters other than letters, digits, `.`, `-` and `_` in
  the split's name (TFDS slices such as `train[:10%]`) become `_`."""
  return os.path.join(workdir, f"eval_{re.sub(r'[^A-Za-z0-9._-]', '_', split)}_{step}.json")


def _mesh(config) -> jax.sharding.Mesh:
  try:
    return sharding.make_mesh(config.mesh)
  except sharding.MeshError:
    return sharding.make_mesh((-1, 1))


def evaluate(workdir: str, split=None, which: str = "latest", batch=None,
             probe_examples: int = 0) -> dict:
  """Evaluates the run in `workdir` at checkpoint `which` on `split`; returns what
  eval_<split>_<step>.json holds (written by `main`). Raises RunError, DatasetError or
  UsageError for a mistake, before anything is computed."""
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise runs.RunError(f"{workdir} does not exist")
  config = with_defaults(runs.read_config(workdir))
  ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), create=False)
  try:
    step = runs.resolve_step(workdir, which, ckpts.all_steps())
    if split is not None:
      config.dataset.eval_split = split
    split = config.dataset.eval_split
    info = data.dataset_info(config.dataset)
    mesh = _mesh(config)
    if batch is None:
      batch = config.eval_batch_size or config.batch_size
    data_devices, processes = mesh.shape["data"], jax.process_count()
    if batch < 1 or batch % data_devices or batch % processes:
      raise UsageError(f"--batch {batch}: the eval batch must be a positive multiple of the "
                       f"mesh's data axis ({data_devices} devices) and of the process count "
                       f"({processes})")
    trainer = steps.make_trainer(config, info.num_classes, mesh, total_steps=1)
    try:
      state, _ = ckpts.restore(step, checkpoint.abstract_with_shardings(
          trainer.abstract_state, trainer.state_shardings))
    except Exception as e:  # pylint: disable=broad-except  # any unreadable step
      first = str(e).splitlines()[0][:300] if str(e) else ""
      raise runs.RunError(f"checkpoint step {step} in {workdir} could not be restored "
                          f"({type(e).__name__}: {first})") from None
  finally:
    ckpts.close()
  _, make_iter = data.eval_batches(config.dataset, global_batch_size=batch)
  probe_iter = probe_examples and data.eval_batches(
      config.dataset, global_batch_size=batch, side="train", max_examples=probe_examples)[1]
  result = evaluation.evaluate_split(trainer.eval_step, state, make_iter,
                                     trainer.batch_sharding, step, probe_iter or None)
  return dict(workdir=workdir, split=split, step=step, checkpoint=which, batch_size=batch,
              mesh=list(mesh.shape.values()), variant=config.variant,
              num_heads=config.model.num_heads, **result)


def summary_line(result: dict, path: str) -> str:
  heads = evaluation.console_line(result)  # cosine, CKA, ablations (and probes) of the heads
  return (f"{result['split']} at step {result['step']}: accuracy "
          f"{100 * result['eval_accuracy']:.2f}%, loss {result['eval_loss']:.4f} "
          f"({result['eval_count']} examples){'; ' + heads if heads else ''} -> {path}")


def main(argv) -> int:
  """`argv` without the program name; returns the exit status (0, or 1 for a mistake)."""
  def action(args):
    if args.probe_examples < 0:
      raise UsageError(f"--probe-examples {args.probe_examples}: give a number of training "
                       "examples >= 0 (0: no probes)")
    result = evaluate(args.workdir, args.split, args.step, args.batch, args.probe_examples)
    path = output_path(result["workdir"], result["split"], result["step"])
    if jax.process_index() != 0:
      return None
    write_json_atomic(path, result)
    return summary_line(result, path)
  return run_tool(argv, parser(), action, (UsageError, runs.RunError, data.DatasetError))


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
