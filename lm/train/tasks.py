"""Tasks: what the trainer trains. The loop knows nothing else about an objective.

A task declares
- `batch_spec(config)`: the batch's keys -> (shape, dtype), global shapes;
- `doc_transform` / `batch_transform(tokenizer)`: hooks for the data pipeline
  (lm/data/pipeline.py), per document before packing and per packed batch, and
  `row_length()`, the packed rows' length; or `data_iter` for data of another shape;
- `loss(model, params, extra, batch, rng, deterministic)`: (sum, weight, aux sums), so
  microbatches add up exactly to the big batch; the trainer divides by the weight;
- `eval_stats` (sums over a batch) and `eval_metrics` (the metrics from summed stats), so
  evaluation over many batches and processes is exact too;
- `init_extra(params)`: extra state kept beside `params` in the train state and the
  checkpoint, never trained (a frozen reference model, a teacher); {} for most tasks.

Tasks are registered by name (`config.task.name`); `register` adds one (tests add their
own without touching the trainer).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

Batch = dict[str, Any]


class Task:
  """The base task: subclasses override what differs. `config` is the resolved run config."""
  name = ''
  # The checkpoint keeps the best eval by this metric (lower is better).
  best_metric = 'eval/loss'

  def __init__(self, config):
    self.config = config

  def batch_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    raise NotImplementedError

  def doc_transform(self, tokenizer) -> Callable | None:
    del tokenizer
    return None

  def batch_transform(self, tokenizer) -> Callable | None:
    del tokenizer
    return None

  def row_length(self) -> int:
    """Tokens per packed row that the data pipeline cuts (model.max_len for most tasks)."""
    return self.config.model.max_len

  def data_iter(self, tokenizer, split: str, num_batches: int | None = None):
    """This process's batches (dicts of numpy arrays, keys as batch_spec): for split
    'train' an endless iterator with get_state/set_state, else one finite pass
    (num_batches caps it) that each iter() restarts. The default is lm.data's packed
    rows with this task's hooks; tasks with other data (labelled examples) override it."""
    from lm import data as lm_data  # lazy: lm.data imports the tokenizers
    hooks = dict(doc_transform=self.doc_transform(tokenizer),
                 transform=self.batch_transform(tokenizer), seq_len=self.row_length())
    if split == 'train':
      return lm_data.make_train_iter(self.config, tokenizer, **hooks)
    return lm_data.make_eval_iter(self.config, tokenizer, num_batches=num_batches, **hooks)

  def init_extra(self, params) -> dict:
    del params
    return {}

  def loss(self, model, params, extra, batch: Batch, rng, deterministic: bool):
    raise NotImplementedError

  def eval_stats(self, model, params, extra, batch: Batch) -> dict[str, jax.Array]:
    s, w, _ = self.loss(model, params, extra, batch, None, True)
    return {'loss_sum': s, 'weight': w}

  def eval_metrics(self, stats: dict[str, float]) -> dict[str, float]:
    return {'eval/loss': stats['loss_sum'] / max(stats['weight'], 1.0)}


def _forward(model, params, batch, rng, deterministic, **kwargs):
  rngs = None if deterministic or rng is None else {'dropout': rng}
  return model.apply({'params': params}, batch['inputs'], positions_BT=batch.get('positions'),
                     segment_ids_BT=batch.get('segment_ids'), deterministic=deterministic,
                     rngs=rngs, **kwargs)


def token_log_probs(logits_BTV, targets_BT):
  """log p(target) per position, in float32."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  return -optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)


class CausalLM(Task):
  """Next-token cross entropy (float32), masked by batch['weights']; optional z-loss.

  The batch is the packed rows of lm/data/pipeline.py. Eval: loss and perplexity.
  """
  name = 'causal_lm'

  def batch_spec(self):
    shape = (self.config.train.batch_size, self.config.model.max_len)
    return dict(inputs=(shape, np.int32), targets=(shape, np.int32),
                segment_ids=(shape, np.int32), positions=(shape, np.int32),
                weights=(shape, np.float32))

  def loss(self, model, params, extra, batch, rng, deterministic):
    del extra
    logits_BTV = _forward(model, params, batch, rng, deterministic).astype(jnp.float32)
    loss_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch['targets'])
    weights_BT = batch['weights'].astype(jnp.float32)
    aux = {}
    z_loss = self.config.task.z_loss
    if z_loss:  # PaLM's auxiliary loss keeps the softmax normaliser near 1
      z_BT = z_loss * jnp.square(jax.nn.logsumexp(logits_BTV, axis=-1))
      aux['z_loss'] = jnp.sum(z_BT * weights_BT)
      loss_BT = loss_BT + z_BT
    return jnp.sum(loss_BT * weights_BT), jnp.sum(weights_BT), aux

  def eval_stats(self, model, params, extra, batch):
    logits_BTV = _forward(model, params, batch, None, True)
    nll_BT = -token_log_probs(logits_BTV, batch['targets'])
    weights_BT = batch['weights'].astype(jnp.float32)
    return {'loss_sum': jnp.sum(nll_BT * weights_BT), 'weight': jnp.sum(weights_BT)}

  def eval_metrics(self, stats):
    loss = stats['loss_sum'] / max(stats['weight'], 1.0)
    return {'eval/loss': loss, 'eval/perplexity': math.exp(min(loss, 50.0))}


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
  """Adds a task class to the registry under its `name` (usable as a decorator)."""
  TASKS[cls.name] = cls
  return cls


register(CausalLM)


def get_task(config) -> Task:
  name = config.task.name
  if name not in TASKS:
    raise ValueError(f'Unknown task.name {name!r}; known: {sorted(TASKS)}.')
  return TASKS[name](config)
