"""metrics.jsonl (the contract in docs/architecture.md), TensorBoard events, progress bar,
loss plot."""
from __future__ import annotations

import json
import pathlib
import sys
import time

import jax


class MetricsWriter:
  """Appends one JSON object a line; process 0 only. TensorBoard without TensorFlow."""

  def __init__(self, workdir, total_steps: int, start_step: int = 0, progress: bool = True):
    self.active = jax.process_index() == 0
    self.path = pathlib.Path(workdir) / 'metrics.jsonl'
    self.total_steps, self.start_step = total_steps, start_step
    self.t0 = time.perf_counter()
    self.tb = None
    self.bar = None
    if not self.active:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(pathlib.Path(workdir) / 'tensorboard'))
    except ImportError:  # optional
      pass
    if progress:
      from tqdm import tqdm
      self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True,
                      file=sys.stderr, mininterval=1.0, disable=None)

  def write(self, record: dict) -> None:
    if not self.active:
      return
    with self.path.open('a') as f:
      f.write(json.dumps(record, default=float) + '\n')
    if self.tb is not None and 'step' in record:
      for k, v in record.items():
        if k != 'step' and isinstance(v, (int, float)):
          self.tb.add_scalar(k, v, record['step'])
      self.tb.flush()

  def progress(self, step: int, loss: float | None, tokens_per_sec: float | None) -> None:
    if self.bar is None:
      return
    self.bar.n = step
    post = {}
    if loss is not None:
      post['loss'] = f'{loss:.4f}'
    if tokens_per_sec:
      post['tok/s'] = f'{tokens_per_sec:,.0f}'
    self.bar.set_postfix(post, refresh=False)
    self.bar.refresh()

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.tb is not None:
      self.tb.close()


def read_metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(workdir) -> pathlib.Path | None:
  """loss.png: train and eval loss against step."""
  if jax.process_index() != 0:
    return None
  from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone
  records = read_metrics(workdir)
  train = [(r['step'], r['train/loss']) for r in records if 'train/loss' in r]
  evals = [(r['step'], r['eval/loss']) for r in records if 'eval/loss' in r]
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  if train:
    ax.plot(*zip(*train), label='train')
  if evals:
    ax.plot(*zip(*evals), 'o-', label='eval')
  ax.set_xlabel('step')
  ax.set_ylabel('loss')
  ax.legend()
  ax.grid(alpha=0.3)
  path = pathlib.Path(workdir) / 'loss.png'
  fig.savefig(path, dpi=100, bbox_inches='tight')
  return path
