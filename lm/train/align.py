"""Alignment tasks on preference pairs (lm/data/preferences.py): dpo and reward.

Task dpo: Direct Preference Optimization (Rafailov et al. 2023), as TRL's DPOTrainer defines
it. Per pair, logps = the sum of the response tokens' log-probs (chosen, rejected) under the
policy and under the reference; logits = (pi_c - pi_r) - (ref_c - ref_r);
  sigmoid: -(1 - ls) log sigmoid(beta logits) - ls log sigmoid(-beta logits)
           (task.label_smoothing = ls > 0: conservative DPO, cDPO)
  ipo:     (logits - 1 / (2 beta))^2 over the average log-prob per response token (TRL
           divides both policy's and reference's logps by the response length for IPO).
task.rpo_alpha > 0 adds alpha times the chosen response's negative log-likelihood per token
(RPO, Pang et al. 2024; TRL's rpo_alpha, which averages it over the batch's chosen tokens,
here per pair so microbatches add up exactly): DPO alone lowers the chosen responses'
likelihood too, and with near-miss rejections greedy decoding then degrades.
Metrics (as TRL names them; train/... means over the pairs): rewards/chosen and
rewards/rejected = beta (policy - reference) logps, rewards/accuracies = the share with
chosen reward > rejected reward, rewards/margins = their mean difference, logps/chosen,
logps/rejected. Eval: eval/loss, eval/reward_accuracy (held-out pairs ranked by implicit
reward; an exact tie, as at step 0 where policy = reference, counts a half, so an untrained
policy scores 50%), eval/margin, eval/ref_accuracy (the reference's own ranking: the chosen
response more likely, as a whole, than the rejected one).

The reference (task.reference):
- 'step': computed in the step. With LoRA / QLoRA (peft.method lora|qlora) it is the same
  params with every lora_b leaf zero: exactly the base, no second copy of the weights;
  otherwise init_extra keeps a frozen copy of the initial (config.init_from) params as
  state['extra']['reference'].
- 'precomputed': the reference log-probs of every pair are computed once, before training,
  with the weights of config.init_from (reference_logps), and the data iterator attaches them
  to each batch (ref_logps); the step runs the policy alone. With QLoRA this reference is the
  unquantised base.

Task reward: a reward model, the decoder with model.num_labels=1 and head='classify' (its
scalar on the last non-pad token: the response's EOS), Bradley-Terry loss
-log sigmoid(r_chosen - r_rejected); task.rpo_alpha > 0 adds alpha times the chosen
response's NLL per token from the same pass (the language-model head beside the scalar:
GRM's text-generation regulariser, Yang et al. 2024, which keeps the hidden states computing
the answer the scalar has to check). Metrics: accuracy (r_chosen > r_rejected), margin;
eval/loss, eval/accuracy (pairwise, held-out pairs), eval/margin. LoRA reward models train
the new head too (peft.train_also defaults to 'classifier').
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lm import peft
from lm.train import tasks

REFERENCES = ('step', 'precomputed')
LOSS_TYPES = ('sigmoid', 'ipo')


def dpo_loss(logps_B2, ref_logps_B2, beta: float, label_smoothing: float = 0.0,
             loss_type: str = 'sigmoid'):
  """(losses [B], chosen rewards [B], rejected rewards [B]) as TRL's DPOTrainer.dpo_loss,
  from (chosen, rejected) log-probs of the policy and the reference (for ipo: averages
  per response token)."""
  logits_B = (logps_B2[:, 0] - logps_B2[:, 1]) - (ref_logps_B2[:, 0] - ref_logps_B2[:, 1])
  if loss_type == 'sigmoid':
    losses_B = (-jax.nn.log_sigmoid(beta * logits_B) * (1 - label_smoothing)
                - jax.nn.log_sigmoid(-beta * logits_B) * label_smoothing)
  elif loss_type == 'ipo':
    losses_B = (logits_B - 1 / (2 * beta)) ** 2
  else:
    raise ValueError(f'Unknown task.loss_type {loss_type!r}; known: {LOSS_TYPES}.')
  rewards_B2 = beta * jax.lax.stop_gradient(logps_B2 - ref_logps_B2)
  return losses_B, rewards_B2[:, 0], rewards_B2[:, 1]


def flat_pairs(batch):
  """[B, 2, ...] pair rows -> [2B, ...] rows (chosen and rejected interleaved)."""
  return {k: batch[k].reshape((-1,) + batch[k].shape[2:])
          for k in ('inputs', 'targets', 'segment_ids', 'positions', 'weights')}


def sequence_logps(model, params, batch, rng=None, deterministic=True):
  """(sums of the response tokens' log-probs, response token counts), both float32 [B, 2]."""
  rows = flat_pairs(batch)
  b = batch['inputs'].shape[0]
  # pylint: disable-next=protected-access  (the one forward every task uses)
  logits_RTV = tasks._forward(model, params, rows, rng, deterministic)
  weights_RT = rows['weights'].astype(jnp.float32)
  lp_RT = jnp.where(weights_RT > 0, tasks.token_log_probs(logits_RTV, rows['targets']), 0.0)
  return (jnp.sum(lp_RT * weights_RT, -1).reshape(b, 2),
          jnp.sum(weights_RT, -1).reshape(b, 2))


def reference_logps(model, params, examples, batch_size: int = 32) -> np.ndarray:
  """The reference's log-prob sums of every pair of `examples` (preferences.PairExamples),
  float32 [N, 2]: the 'precomputed' reference, one jitted forward per batch_size pairs."""
  fn = jax.jit(lambda p, b: sequence_logps(model, p, b)[0])
  out = np.zeros((len(examples), 2), np.float32)
  for i in range(0, len(examples), batch_size):
    rows = np.arange(i, i + batch_size)  # the last batch padded with empty pairs
    got = np.asarray(fn(params, examples.batch(rows)))
    n = min(batch_size, len(examples) - i)
    out[i:i + n] = got[:n]
  return out


def _check_decoder(config, name):
  family = config.model.get('family', 'decoder')
  if family != 'decoder':
    raise ValueError(f'task {name} needs model.family=decoder, not {family!r}.')
  method = config.peft.method
  if method not in ('none', 'lora', 'qlora'):
    raise ValueError(f'task {name} supports peft.method none, lora or qlora, not {method!r}.')


class _Pairs(tasks.Task):
  """Batches of preference pairs (lm/data/preferences.py), cached per split."""

  def __init__(self, config):
    super().__init__(config)
    _check_decoder(config, self.name)
    self._examples = {}

  def row_length(self):
    from lm import config as lm_config  # lazy: lm.config imports lm.data
    return lm_config.row_length(self.config)

  def batch_spec(self):
    shape = (self.config.train.batch_size, 2, self.row_length())
    return dict(inputs=(shape, np.int32), targets=(shape, np.int32),
                segment_ids=(shape, np.int32), positions=(shape, np.int32),
                weights=(shape, np.float32))

  def examples(self, tokenizer, train: bool):
    from lm.data import preferences  # lazy: lm.data imports the tokenizers
    if train not in self._examples:
      self._examples[train] = preferences.load_examples(self.config, tokenizer, train)
    return self._examples[train]

  def data_iter(self, tokenizer, split, num_batches=None):
    from lm.data import preferences  # lazy: lm.data imports the tokenizers
    examples = self.examples(tokenizer, split == 'train')
    if split == 'train':
      return preferences.make_train_iter(self.config, examples)
    return preferences.make_eval_iter(self.config, examples, num_batches)


def pair_weights(counts_B2):
  """1 for a real pair (both responses have trained tokens), 0 for a padding pair."""
  return ((counts_B2[:, 0] > 0) & (counts_B2[:, 1] > 0)).astype(jnp.float32)


class DPO(_Pairs):
  """Direct Preference Optimization and its variants (module docstring)."""
  name = 'dpo'

  def __init__(self, config):
    super().__init__(config)
    t = config.task
    self.beta = float(t.get('beta', 0.1))
    self.label_smoothing = float(t.get('label_smoothing', 0.0))
    self.loss_type = t.get('loss_type', 'sigmoid')
    self.reference = t.get('reference', 'step')
    self.rpo_alpha = float(t.get('rpo_alpha', 0.0))
    if self.loss_type not in LOSS_TYPES:
      raise ValueError(f'Unknown task.loss_type {self.loss_type!r}; known: {LOSS_TYPES}.')
    if self.reference not in REFERENCES:
      raise ValueError(f'Unknown task.reference {self.reference!r}; known: {REFERENCES}.')
    if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5:
      raise ValueError(f'task dpo needs beta > 0 and 0 <= label_smoothing < 0.5 (got '
                       f'{self.beta}, {self.label_smoothing}).')
    if self.loss_type == 'ipo' and self.label_smoothing:
      raise ValueError('task.label_smoothing applies to loss_type sigmoid (cDPO), not ipo.')
    if self.reference == 'precomputed' and not config.get('init_from'):
      raise ValueError('task.reference=precomputed computes the reference from the weights of '
                       'config.init_from, which is empty; set it or use reference=step.')
    self.lora = config.peft.method in ('lora', 'qlora')

  def batch_spec(self):
    spec = super().batch_spec()
    if self.reference == 'precomputed':
      spec['ref_logps'] = ((self.config.train.batch_size, 2), np.float32)
    return spec

  def examples(self, tokenizer, train):
    examples = super().examples(tokenizer, train)
    if self.reference == 'precomputed' and examples.ref_logps is None:
      super().examples(tokenizer, not train)  # both splits: the reference is loaded once
      self.attach_reference(tokenizer)
    return examples

  def attach_reference(self, tokenizer, model=None, params=None):
    """Precomputes the reference log-probs of both splits (with model/params, default the
    plain model of config.init_from, loaded here and freed after) into the cached examples,
    whose batches then carry them (ref_logps)."""
    del tokenizer
    if model is None:
      from lm.infer import load  # lazy: inference loading is only needed here
      model = load.build_model(self.config, adapters=None)
      params = load.load_base(self.config)
    for train, examples in self._examples.items():
      if examples.ref_logps is None:
        examples.ref_logps = reference_logps(model, params, examples,
                                             self.config.train.batch_size)
        print(f'Reference log-probs of the {len(examples)} {"train" if train else "eval"} '
              f'pairs precomputed with the weights of {self.config.init_from}.')

  def init_extra(self, params):
    if self.reference == 'precomputed' or self.lora:
      return {}
    # A copy, never the params' own buffers (the train step donates the state).
    return {'reference': jax.tree.map(jnp.copy, params)}

  def _ref_logps(self, model, params, extra, batch):
    if self.reference == 'precomputed':
      return batch['ref_logps'].astype(jnp.float32)
    ref = peft.adapters_off(params) if self.lora else extra['reference']
    return jax.lax.stop_gradient(sequence_logps(model, ref, batch)[0])

  def _pair_stats(self, model, params, extra, batch, rng, deterministic):
    logps_B2, counts_B2 = sequence_logps(model, params, batch, rng, deterministic)
    sums_B2 = logps_B2
    ref_B2 = self._ref_logps(model, params, extra, batch)
    pw_B = pair_weights(counts_B2)
    ref_sums_B2 = ref_B2
    if self.loss_type == 'ipo':  # TRL: average log-probs per response token
      denom = jnp.maximum(counts_B2, 1.0)
      logps_B2, ref_B2 = logps_B2 / denom, ref_B2 / denom
    losses_B, chosen_B, rejected_B = dpo_loss(logps_B2, ref_B2, self.beta,
                                              self.label_smoothing, self.loss_type)
    if self.rpo_alpha:  # RPO: + alpha * the chosen response's NLL per token
      nll_B = -sums_B2[:, 0] / jnp.maximum(counts_B2[:, 0], 1.0)
      losses_B = losses_B + self.rpo_alpha * nll_B
    return losses_B * pw_B, chosen_B, rejected_B, pw_B, logps_B2, ref_sums_B2

  def loss(self, model, params, extra, batch, rng, deterministic):
    losses_B, chosen_B, rejected_B, pw_B, logps_B2, _ = self._pair_stats(
        model, params, extra, batch, rng, deterministic)
    sg = jax.lax.stop_gradient
    aux = {'rewards/chosen': jnp.sum(chosen_B * pw_B),
           'rewards/rejected': jnp.sum(rejected_B * pw_B),
           'rewards/accuracies': jnp.sum((chosen_B > rejected_B) * pw_B),
           'rewards/margins': jnp.sum((chosen_B - rejected_B) * pw_B),
           'logps/chosen': jnp.sum(sg(logps_B2[:, 0]) * pw_B),
           'logps/rejected': jnp.sum(sg(logps_B2[:, 1]) * pw_B)}
    return jnp.sum(losses_B), jnp.sum(pw_B), aux

  def eval_stats(self, model, params, extra, batch):
    losses_B, chosen_B, rejected_B, pw_B, _, ref_B2 = self._pair_stats(
        model, params, extra, batch, None, True)
    # A tie (policy = reference) is a coin flip: half right.
    right_B = jnp.where(chosen_B > rejected_B, 1.0, jnp.where(chosen_B == rejected_B, 0.5, 0.0))
    return {'loss_sum': jnp.sum(losses_B), 'weight': jnp.sum(pw_B),
            'correct': jnp.sum(right_B * pw_B),
            'margin': jnp.sum((chosen_B - rejected_B) * pw_B),
            'chosen': jnp.sum(chosen_B * pw_B), 'rejected': jnp.sum(rejected_B * pw_B),
            'ref_correct': jnp.sum((ref_B2[:, 0] > ref_B2[:, 1]) * pw_B)}

  def eval_metrics(self, stats):
    n = max(stats['weight'], 1.0)
    return {'eval/loss': stats['loss_sum'] / n, 'eval/reward_accuracy': stats['correct'] / n,
            'eval/margin': stats['margin'] / n, 'eval/rewards/chosen': stats['chosen'] / n,
            'eval/rewards/rejected': stats['rejected'] / n,
            'eval/ref_accuracy': stats['ref_correct'] / n}


class Reward(_Pairs):
  """A Bradley-Terry reward model (module docstring)."""
  name = 'reward'

  def __init__(self, config):
    super().__init__(config)
    if config.model.get('num_labels', 0) != 1:
      raise ValueError('task reward needs --config.model.num_labels=1 (one scalar reward on '
                       f'the last token), not {config.model.get("num_labels", 0)}.')
    self.lm_weight = float(config.task.get('rpo_alpha', 0.0))

  def rewards(self, model, params, batch, rng=None, deterministic=True):
    """(rewards [B, 2], pair weights [B], the chosen responses' NLL per token [B] or None)."""
    rows = flat_pairs(batch)
    b = batch['inputs'].shape[0]
    out = model.apply({'params': params}, rows['inputs'], positions_BT=rows['positions'],
                      segment_ids_BT=rows['segment_ids'], deterministic=deterministic,
                      rngs=None if deterministic or rng is None else {'dropout': rng},
                      **(dict(head='lm_classify', lm_rows=slice(0, None, 2))  # chosen rows
                         if self.lm_weight else dict(head='classify')))
    weights_B2T = rows['weights'].astype(jnp.float32).reshape(b, 2, -1)
    nll_B = None
    if self.lm_weight:  # GRM: the chosen response's NLL per token, from the same pass
      logits_BTV, out = out  # the chosen rows' alone (rows interleave chosen, rejected)
      lp_BT = tasks.token_log_probs(logits_BTV, batch['targets'][:, 0])
      w_BT = weights_B2T[:, 0]
      nll_B = -jnp.sum(jnp.where(w_BT > 0, lp_BT, 0.0) * w_BT, -1) / jnp.maximum(
          jnp.sum(w_BT, -1), 1.0)
    return (out[:, 0].astype(jnp.float32).reshape(b, 2),
            pair_weights(jnp.sum(weights_B2T, -1)), nll_B)

  def _stats(self, model, params, batch, rng, deterministic):
    r_B2, pw_B, nll_B = self.rewards(model, params, batch, rng, deterministic)
    margin_B = r_B2[:, 0] - r_B2[:, 1]
    losses_B = -jax.nn.log_sigmoid(margin_B)
    if nll_B is not None:
      losses_B = losses_B + self.lm_weight * nll_B
    return {'loss_sum': jnp.sum(losses_B * pw_B), 'weight': jnp.sum(pw_B),
            'correct': jnp.sum((margin_B > 0) * pw_B), 'margin': jnp.sum(margin_B * pw_B)}

  def loss(self, model, params, extra, batch, rng, deterministic):
    del extra
    s = self._stats(model, params, batch, rng, deterministic)
    sg = jax.lax.stop_gradient
    return s['loss_sum'], s['weight'], {'accuracy': sg(s['correct']), 'margin': sg(s['margin'])}

  def eval_stats(self, model, params, extra, batch):
    del extra
    return self._stats(model, params, batch, None, True)

  def eval_metrics(self, stats):
    n = max(stats['weight'], 1.0)
    return {'eval/loss': stats['loss_sum'] / n, 'eval/accuracy': stats['correct'] / n,
            'eval/margin': stats['margin'] / n}


tasks.register(DPO)
tasks.register(Reward)
