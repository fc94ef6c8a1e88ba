r"""The training loop's speed against its step's: `python -m featdiv_jax.bench --e2e`.

  python -m featdiv_jax.bench --e2e --config configs/digits.py:multi_cos --steps 60 --rounds 3
  python -m featdiv_jax.bench --e2e --config configs/digits.py:multi_cos,smoke --steps 200

Each round runs the real training loop -- `featdiv_jax.train.TrainingRun`, the code path of
`featdiv_jax.main`: its input pipeline, device transfers, metrics, logging and final evaluation,
checkpoints off -- for `--steps` steps in a fresh temporary workdir, then times the loop's own
compiled step alone on one batch from that pipeline, `--steps` steps back to back with one wait
at the end (the device's rate with nothing else to do). One trainer serves every round, so
nothing compiles after the first. The loop's rate is the run's own train_images_per_s: steps
after the first (which compiles), evaluations excluded.

Printed per round and as medians: loop img/s, step img/s, loop / step, and the host time per step
outside the step (loop time per step - step time per step); then the input pipeline alone: its
img/s and CPU seconds (all threads of this process) per image. Needs TensorFlow (the pipeline).
"""

import json
import os
import tempfile
import time

import jax
import numpy as np

from featdiv_jax import cli, configlib


def load_config(spec: str, steps: int, data_dir: str | None = None):
  """The benchmark's config: `spec`'s, one variant, `steps` + 1 steps, evaluated once at the end
  without probes."""
  config = cli.load(spec)
  if data_dir is not None:
    config.dataset.data_dir = data_dir
  if config.variant == configlib.COMPARE:
    raise configlib.ConfigError(f"--config={spec}: --e2e times one model; add a variant, e.g. "
                                f"{spec.partition(':')[0]}:multi_cos")
  config = configlib.with_protocol(config)
  config.model.init_from, config.model.frozen_heads = "", ()
  config.total_steps = steps + 1           # the first step compiles and is not timed
  config.eval_every_steps = config.total_steps
  config.analysis.probe_examples = 0
  configlib.validate(config, jax.device_count(), jax.process_count())
  return config


def time_step(trainer, config, batch, steps: int) -> float:
  """img/s of the loop's compiled step, `steps` back to back after one warm-up call."""
  from featdiv_jax import train
  state, _ = train.initial_state(config, trainer)
  step = train.loop_step(trainer)
  state, carry = step(state, batch, None)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state, carry = step(state, batch, carry)
  jax.block_until_ready((state, carry))
  return steps * config.batch_size / (time.perf_counter() - start)


def time_pipeline(config, batches: int, warmup: int = 5) -> dict:
  """The training input stream alone: img/s and this process's CPU seconds per image."""
  from featdiv_jax import data
  it = data.train_batches(config.dataset, global_batch_size=config.batch_size, seed=0)
  for _ in range(warmup):
    next(it)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  images = batches * config.batch_size
  return dict(pipeline_img_per_s=images / wall, pipeline_cpu_ms_per_image=1e3 * cpu / images)


def run(args) -> dict:
  from featdiv_jax import data, sharding, train
  config = load_config(args.config, args.steps, args.data_dir)
  info = data.dataset_info(config.dataset)
  trainer = train.make_trainer(config, info)
  batch = sharding.global_batch(
      next(data.train_batches(config.dataset, global_batch_size=config.batch_size, seed=0)),
      trainer.batch_sharding)
  rounds = []
  for _ in range(args.rounds):
    with tempfile.TemporaryDirectory() as workdir:
      results = train.train_validated(config, workdir, trainer=trainer, checkpoints=False)
    loop = results["train_images_per_s"]
    step = time_step(trainer, config, batch, args.steps)
    rounds.append(dict(loop_img_per_s=loop, step_img_per_s=step, loop_over_step=loop / step,
                       host_ms_per_step=1e3 * config.batch_size * (1 / loop - 1 / step)))
  medians = {k: float(np.median([r[k] for r in rounds])) for k in rounds[0]}
  return dict(config=args.config, arch=config.model.arch, heads=config.model.num_heads,
              batch=config.batch_size, image_size=config.dataset.image_size, steps=args.steps,
              rounds=rounds, **medians, **time_pipeline(config, args.pipeline_batches),
              device=str(jax.devices()[0].device_kind), num_devices=jax.device_count(),
              cpus=os.cpu_count(), jax_version=jax.__version__)


def table(r: dict) -> str:
  lines = [f"{r['config']}: {r['arch']} K={r['heads']} b{r['batch']} {r['image_size']}px, "
           f"{r['steps']} timed steps per round, {r['device']} x{r['num_devices']}",
           f"{'round':<7} {'loop img/s':>10} {'step img/s':>10} {'loop/step':>9} "
           f"{'host ms/step':>12}"]
  for i, row in enumerate(r["rounds"] + [r]):
    name = "median" if i == len(r["rounds"]) else str(i + 1)
    lines.append(f"{name:<7} {row['loop_img_per_s']:10.0f} {row['step_img_per_s']:10.0f} "
                 f"{row['loop_over_step']:9.3f} {row['host_ms_per_step']:12.2f}")
  lines.append(f"input pipeline alone: {r['pipeline_img_per_s']:,.0f} img/s, "
               f"{r['pipeline_cpu_ms_per_image']:.3f} CPU ms per image ({r['cpus']} CPUs)")
  return "\n".join(lines)


def main(args) -> int:
  result = run(args)
  print(table(result), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0
