r"""Train and evaluate: `python -m featdiv_jax.main --config=configs/X.py[:arg] --workdir=DIR`.

Re-running the same command resumes from the latest checkpoint in DIR. With the `compare`
variant (the digits default) each of `config.compare_variants` trains in DIR/<variant> and a
table of their accuracies is printed at the end.
"""

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':variant,key=value,...'.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.json.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for jax.distributed (multi-host runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host runs).")



class _QuietLibraries(std_logging.Filter):
  """Drops orbax's and TFDS's per-save / per-read INFO chatter; warnings still pass."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in ("/orbax/", "/tensorflow_datasets/"))


def maybe_initialize_distributed(mode: str) -> bool:
  """Starts JAX's distributed runtime when asked to or when a cluster environment is detected."""
  import jax
  explicit = FLAGS.coordinator_address is not None
  if mode == "off" and not explicit:
    return False
  if mode == "auto" and not explicit:
    multi_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if not (multi_slurm or tpu_pod or "JAX_COORDINATOR_ADDRESS" in os.environ
            or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ):
      return False
  if jax.distributed.is_initialized():
    return True
  jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                             num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
  return True


def run(config, workdir: str) -> dict:
  """One model, or every variant of a comparison; returns {variant: results}."""
  from featdiv_jax import configlib, train
  if config.variant != configlib.COMPARE:
    return {config.variant: train.train_and_evaluate(config, workdir)}
  return {v: train.train_and_evaluate(configlib.with_variant(config, v), os.path.join(workdir, v))
          for v in config.compare_variants}


def summary_table(results: dict) -> str:
  rows = ["variant     heads  params       best acc  final acc  head cos  img/s"]
  for variant, r in results.items():
    cos = r["history"][-1]["eval_head_cosine"] if r["history"] else None
    rows.append(f"{variant:<11} {r['config']['model']['num_heads']:>5}  {r['num_params']:>11,}  "
                f"{_pct(r['best_eval_accuracy'])}  {_pct(r['final_eval_accuracy'])}   "
                f"{'   -  ' if cos is None else f'{cos:6.3f}'}  "
                f"{r['train_images_per_s'] or 0:6.0f}")
  return "\n".join(rows)


def _pct(x):
  return "     -  " if x is None else f"{100 * x:7.2f}%"


def main(argv):
  if len(argv) > 1:  # called directly with flags (not through app.run): parse them now
    saved, sys.argv = sys.argv, list(argv)  # config_flags reads --config.x overrides from here
    try:
      FLAGS.unparse_flags()
      for name in [n for n in FLAGS if n.startswith("config.")]:
        delattr(FLAGS, name)  # override flags of an earlier call are defined anew
      FLAGS(argv)
    finally:
      sys.argv = saved
  if FLAGS.config is None or not FLAGS.workdir:
    print("usage: python -m featdiv_jax.main --config=configs/digits.py[:variant,...] "
          "--workdir=DIR", file=sys.stderr)
    return 2
  config = FLAGS.config
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
  maybe_initialize_distributed(config.distributed)
  import jax
  from featdiv_jax import data, sharding, train
  try:
    results = run(config, FLAGS.workdir)
  except (data.DatasetError, sharding.MeshError, train.WorkdirError) as e:
    print(f"featdiv_jax: error: {e}", file=sys.stderr)
    return 1
  if jax.process_index() == 0:
    print(summary_table(results), flush=True)
  return 0


if __name__ == "__main__":
  app.run(main)
