"""A training run's progress: one owner for the step, the eval history, time and throughput.

`Progress` is what a checkpoint's `meta` item holds (`to_json` / `from_json`), so a resumed run
continues its history, its wall time and its running train averages from exactly the step it
restarts from. No TensorFlow here.
"""

import dataclasses
import time
from typing import Optional

from featdiv_jax import metrics


class Stopwatch:
  """Training seconds and images, excluding the compiling first step, evals and checkpoints."""

  def __init__(self):
    self.seconds, self.images, self._since = 0.0, 0, None

  def start(self):
    self._since = time.time()

  def stop(self):
    if self._since is not None:
      self.seconds += time.time() - self._since
      self._since = None

  def lap(self):
    if self._since is not None:
      self.stop()
      self.start()

  def rate(self) -> float | None:
    return self.images / self.seconds if self.seconds > 0 and self.images else None


@dataclasses.dataclass
class Progress:
  """Where a run stands. `watch` times training alone; `wall_time_s` counts everything."""
  step: int = 0
  history: list = dataclasses.field(default_factory=list)  # one dict per evaluation
  wall_time_s: float = 0.0
  train_images_per_s: Optional[float] = None
  skipped_steps: int = 0                      # non-finite updates dropped (skip_nonfinite)
  eval_head_cosine_matrix: Optional[list] = None  # of the latest evaluation
  eval_head_cka_matrix: Optional[list] = None     # of the latest evaluation
  # The eval interval's running train averages: they travel in the checkpoint, so a run resumed
  # between two evals reports the same train_loss as an uninterrupted one.
  since_eval: Optional[metrics.TrainMetrics] = None
  # Where model.init_from's heads came from: {"path", "step", "head"} (step None for a file).
  initialised_from: Optional[dict] = None
  watch: Stopwatch = dataclasses.field(default_factory=Stopwatch, repr=False)
  _clock: float = dataclasses.field(default_factory=time.time, repr=False)

  def start_clock(self) -> None:
    """Wall time counts from now (a resumed run does not count the time it was away)."""
    self._clock = time.time()

  def advance(self, step: int) -> None:
    """Brings the record up to `step`: wall time since the last call, the latest images/s."""
    now = time.time()
    self.step = step
    self.wall_time_s += now - self._clock
    self._clock = now
    self.train_images_per_s = self.watch.rate() or self.train_images_per_s

  @property
  def best(self) -> Optional[dict]:
    """The history entry with the best eval accuracy (the first of equals), or None."""
    if not self.history:
      return None
    return max(self.history, key=lambda h: (h["eval_accuracy"], -h["step"]))

  def add_evaluation(self, entry: dict, head_cosine_matrix: list,
                     head_cka_matrix: Optional[list] = None) -> None:
    self.history.append(entry)
    self.eval_head_cosine_matrix = head_cosine_matrix
    self.eval_head_cka_matrix = head_cka_matrix
    self.since_eval = None

  def to_json(self) -> dict:
    return dict(step=self.step, history=self.history, wall_time_s=self.wall_time_s,
                train_images_per_s=self.train_images_per_s, skipped_steps=self.skipped_steps,
                eval_head_cosine_matrix=self.eval_head_cosine_matrix,
                eval_head_cka_matrix=self.eval_head_cka_matrix,
                since_eval=metrics.to_json(self.since_eval),
                initialised_from=self.initialised_from)

  @classmethod
  def from_json(cls, saved: dict) -> "Progress":
    """From a checkpoint's meta; fields that older checkpoints lack take their defaults."""
    return cls(step=saved["step"], history=list(saved.get("history", [])),
               wall_time_s=saved.get("wall_time_s", 0.0),
               train_images_per_s=saved.get("train_images_per_s"),
               skipped_steps=saved.get("skipped_steps", 0),
               eval_head_cosine_matrix=saved.get("eval_head_cosine_matrix"),
               eval_head_cka_matrix=saved.get("eval_head_cka_matrix"),
               since_eval=metrics.from_json(saved.get("since_eval")),
               initialised_from=saved.get("initialised_from"))
