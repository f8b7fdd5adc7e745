"""RL from feedback for decoders: tasks grpo (DeepSeekMath's GRPO) and ppo (InstructGPT's PPO).

Data: prompts, each with an optional reference answer. data.path "" -> the embedded
fine-tuning set (lm/data/finetune_sets.py; task.finetune_examples train prompts,
task.finetune_eval held out); else JSON lines of {"prompt", "completion" (the reference,
optional)} or {"messages": [...]} (the prompt is everything before the last assistant turn,
rendered with the chat template; that turn is the reference), as lm/data/instruct.py encodes
them; eval: data.eval_path, else the last data.val_fraction. Prompts are left-padded to
task.max_prompt_len tokens; longer ones are skipped, counted and logged (all skipped: an
error). A batch is train.batch_size prompts:
  prompts int32 [B, P] (left-padded), prompt_lengths int32 [B], index int32 [B] (the
  record, for the host's reward; -1 = an empty row), weights float32 [B].

The step (all inside the trainer's one jitted train step, so nothing recompiles per step):
1. rollout: task.num_generations responses per prompt of at most task.max_new_tokens tokens,
   sampled at task.temperature with lm/infer/sampling.py's KV-cache internals
   (_decoder_start, _sample_loop) under stop_gradient(params), the policy's current weights;
2. rewards on the host through jax.pure_callback: the prompt text, the response text (cut
   at EOS) and the reference go to the reward (lm/train/rewards.py: task.reward names a
   registered function, or rm:RUN_DIR a reward model); a reward that raises stops the run
   naming the prompt;
3. log-probs of the sampled tokens recomputed under params (with gradient), from logits /
   temperature, and under the reference: with LoRA (peft.method lora/qlora) the same params
   with every lora_b zero (exactly the base, no second copy; base leaves that peft.train_also
   trains, e.g. the final norm, from a copy of their starting values), else a frozen copy of
   the starting weights in the extra state (init_extra);
4. the loss:
   grpo (TRL's GRPOTrainer, task.loss_type 'grpo'): advantages (r - mean_group) /
     (std_group + 1e-4) (std unbiased, as torch's); per token -min(ratio A, clip(ratio, 1 +-
     epsilon) A) + kl_beta * KL, KL the k3 estimator exp(ref - logp) - (ref - logp) - 1;
     averaged over each response's tokens, then over responses. No value model.
     task.loss_type 'dr_grpo' (Liu et al.'s Dr. GRPO, TRL's loss_type): advantages r -
     mean_group (no std), each response's token sum / max_new_tokens (no length bias).
     (task.loss_type is shared with DPO as in TRL; its default 'sigmoid' means 'grpo'.)
   ppo (TRL's PPOTrainer): rewards per token -kl_coef * (logp_old - logp_ref) plus the score
     on the last token; the value head (model.num_labels=1, head='token_classify': the
     'classifier' on every position, trained under LoRA by peft.train_also) gives values; GAE
     (gamma, lam); whitened advantages; loss = policy clipped-ratio loss (cliprange) +
     vf_coef * 0.5 * clipped value loss (cliprange_value), both means over response tokens.
   Updates per rollout: task.updates_per_batch (TRL's num_iterations / num_ppo_epochs). With
   1 the loss makes the rollout itself, its old log-probs (and PPO's old values) are its own:
   ratio 1, the clip inactive. With more, the trainer calls prepare() once a step (the
   rollout, old log-probs and values under the step's starting weights) and the loss that
   many times on its output: from the second update on the ratio leaves 1 and the clip acts.

Metrics (means over the step's responses): train/reward, train/exact_match, train/kl,
train/entropy, train/response_length, train/clip_fraction; grpo also train/zero_std_groups
(the share of groups whose rewards are all equal: no signal); ppo also train/value_loss,
train/value_clip_fraction, train/pg_loss. Eval (held-out prompts, greedy responses):
eval/reward, eval/exact_match, eval/response_length, eval/loss = -eval/reward (the best
checkpoint keeps the highest reward), and eval/sampled_reward (the mean reward of
EVAL_SAMPLES = 8 responses a prompt sampled at task.temperature, as in training, from a
fixed key: the policy's expected reward, which RL maximises).

Task fields: config.task's grpo / ppo section (lm/config.py), documented there.
"""
from __future__ import annotations

import dataclasses

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from lm import peft
from lm.train import rewards as rewards_lib
from lm.train import tasks


EVAL_SAMPLES = 8  # eval/sampled_reward: responses a held-out prompt


def _get(config, name):
  return config.task[name]


# -- the pieces, as pure functions (tests check them on fixed inputs) -------------------

def group_advantages(rewards_N, group: int, eps: float = 1e-4):
  """GRPO: (r - group mean) / (group std + eps), std unbiased (torch's .std()); rows are
  groups of `group` consecutive responses."""
  r_BG = rewards_N.reshape(-1, group)
  mean_B1 = r_BG.mean(axis=1, keepdims=True)
  std_B1 = jnp.std(r_BG, axis=1, keepdims=True, ddof=1) if group > 1 else jnp.zeros_like(mean_B1)
  return ((r_BG - mean_B1) / (std_B1 + eps)).reshape(-1)


def k3_kl(logp, ref_logp):
  """Schulman's k3 estimator of KL(policy || reference), per token (>= 0)."""
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0


def clipped_policy_loss(logp, old_logp, adv, clip: float):
  """Per token (-min(ratio A, clip(ratio) A), clipped?): PPO's surrogate, as max of the
  negatives (TRL's pg_losses / pg_losses2)."""
  ratio = jnp.exp(logp - old_logp)
  loss1 = -adv * ratio
  loss2 = -adv * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
  return jnp.maximum(loss1, loss2), (loss2 > loss1).astype(jnp.float32)


def masked_mean(x, mask, axis=None):
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_whiten(x, mask, eps: float = 1e-8):
  """TRL's masked_whiten (shift_mean=True): (x - mean) / sqrt(var + eps), var unbiased."""
  mean = masked_mean(x, mask)
  n = jnp.sum(mask)
  var = masked_mean(jnp.square(x - mean), mask) * n / jnp.maximum(n - 1.0, 1.0)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def gae(rewards_NR, values_NR, mask_NR, gamma: float, lam: float):
  """(advantages, returns) [N, R] by generalised advantage estimation: delta_t = r_t +
  gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; V and r are 0 past a response's
  end (and V_R = 0), returns = A + V (TRL's PPOTrainer, before whitening)."""
  values_NR = values_NR * mask_NR
  rewards_NR = rewards_NR * mask_NR
  next_NR = jnp.concatenate([values_NR[:, 1:], jnp.zeros_like(values_NR[:, :1])], axis=1)
  delta_NR = rewards_NR + gamma * next_NR - values_NR

  def back(carry_N, delta_N):
    a_N = delta_N + gamma * lam * carry_N
    return a_N, a_N
  _, adv_RN = jax.lax.scan(back, jnp.zeros_like(delta_NR[:, 0]), delta_NR.T, reverse=True)
  adv_NR = adv_RN.T
  return adv_NR, adv_NR + values_NR


def clipped_value_loss(values, old_values, returns, mask, clip: float):
  """(0.5 * masked mean of max((v - R)^2, (clip(v, old +- clip) - R)^2), clipped share)."""
  clipped = jnp.clip(values, old_values - clip, old_values + clip)
  l1, l2 = jnp.square(values - returns), jnp.square(clipped - returns)
  return 0.5 * masked_mean(jnp.maximum(l1, l2), mask), masked_mean((l2 > l1) * 1.0, mask)


def response_mask(resp_NR, eos_id: int):
  """(mask float [N, R]: tokens up to and including the first EOS, length int [N])."""
  r = resp_NR.shape[1]
  is_eos = resp_NR == eos_id
  first_N = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), r - 1)
  mask_NR = (jnp.arange(r)[None, :] <= first_N[:, None]).astype(jnp.float32)
  return mask_NR, first_N + 1


# -- data -------------------------------------------------------------------------------

@dataclasses.dataclass
class Prompt:
  where: str
  ids: list[int]
  text: str
  reference: str | None


def load_prompts(config, tokenizer, train: bool) -> list[Prompt]:
  """The split's prompts (module docstring), those longer than task.max_prompt_len dropped
  (counted, logged)."""
  from lm.data import instruct, labeled, sources  # lazy: lm.data imports the tokenizers
  from lm.infer import sampling
  if not config.data.path:
    records = instruct.split_records(config, train)
  else:
    path = config.data.path if train or not config.data.eval_path else config.data.eval_path
    records = []
    for where, value in sources.json_records(path):
      if isinstance(value, dict) and isinstance(value.get('prompt'), str) and \
          'messages' not in value:
        ref = value.get('completion')
        if ref is not None and not isinstance(ref, str):
          raise ValueError(f'{where}: "completion" must be a string (the reference answer).')
        records.append(instruct.Record(where, prompt=value['prompt'], completion=ref))
      else:
        records.append(instruct.parse_record(value, where))
    if not records:
      raise ValueError(f'{path} holds no prompts.')
    if not config.data.eval_path:
      records = labeled.hold_out(records, config, train)
  template = (instruct.chat_template(config, tokenizer)
              if any(r.messages is not None for r in records) else None)
  limit, out, skipped = _get(config, 'max_prompt_len'), [], []
  eos = tokenizer.eos_id
  for r in records:
    if r.messages is None:
      ids = sampling.encode_prompt(tokenizer, r.prompt)
      text, ref = r.prompt, r.completion
    else:
      ids, target = instruct.prompt_and_target(r, tokenizer, template)
      text = tokenizer.decode(ids)
      ref = tokenizer.decode([t for t in target if t != eos])
    if len(ids) > limit:
      skipped.append(r.where)
      continue
    out.append(Prompt(r.where, list(ids), text, ref))
  split = 'train' if train else 'eval'
  if skipped:
    logging.warning('%d of %d %s prompts are longer than task.max_prompt_len=%d tokens and '
                    'were skipped (first: %s).', len(skipped), len(records), split, limit,
                    skipped[0])
  if not out:
    raise ValueError(f'Every {split} prompt is longer than task.max_prompt_len={limit} tokens '
                     f'(first: {skipped[0]}); raise it (prompt + task.max_new_tokens must fit '
                     'model.max_len).')
  return out


def prompt_batch(prompts: list[Prompt], rows: np.ndarray, width: int, pad: int) -> dict:
  """A batch of the prompts at `rows` (-1: an empty row), left-padded to `width`."""
  b = len(rows)
  tokens = np.full((b, width), pad, np.int32)
  lengths, weights = np.ones(b, np.int32), np.zeros(b, np.float32)
  for i, k in enumerate(rows):
    if k >= 0:
      ids = prompts[k].ids
      tokens[i, width - len(ids):], lengths[i], weights[i] = ids, len(ids), 1.0
  return dict(prompts=tokens, prompt_lengths=lengths, index=np.asarray(rows, np.int32),
              weights=weights)


class _TrainIter:
  """Endless batches of this process: a permutation of the prompts per epoch from
  (seed, epoch); global batch k is stream rows [kB, (k+1)B), this process taking every
  count-th. get_state/set_state: {'batch': k}."""

  def __init__(self, prompts, width, pad, batch, index, count, seed, shuffle):
    self.prompts, self.width, self.pad = prompts, width, pad
    self.batch, self.index, self.count, self.seed, self.shuffle = (batch, index, count, seed,
                                                                   shuffle)
    self.k, self._perm = 0, {}

  def _row(self, pos: int) -> int:
    n = len(self.prompts)
    epoch = pos // n
    if epoch not in self._perm:
      self._perm = {epoch: (np.random.default_rng([self.seed, epoch]).permutation(n)
                            if self.shuffle else np.arange(n))}
    return int(self._perm[epoch][pos % n])

  def __iter__(self):
    return self

  def __next__(self):
    pos = (self.k * self.batch + np.arange(self.batch)) * self.count + self.index
    self.k += 1
    return prompt_batch(self.prompts, np.array([self._row(int(p)) for p in pos]), self.width,
                        self.pad)

  def get_state(self):
    return {'batch': self.k}

  def set_state(self, state):
    self.k = int(state['batch'])


# -- the tasks --------------------------------------------------------------------------

class _RL(tasks.Task):
  """Shared by grpo and ppo: data, rollouts, host rewards, reference, eval."""
  group_default = 8

  def __init__(self, config):
    super().__init__(config)
    family = config.model.get('family', 'decoder')
    if family != 'decoder':
      raise ValueError(f'task {self.name} needs model.family=decoder, not {family!r}.')
    self.g = int(_get(config, 'num_generations') or self.group_default)
    self.p, self.r = _get(config, 'max_prompt_len'), _get(config, 'max_new_tokens')
    self.temperature = float(_get(config, 'temperature'))
    if self.g < 1 or self.p < 1 or self.r < 1 or self.temperature <= 0:
      raise ValueError(f'task {self.name}: need num_generations, max_prompt_len and '
                       'max_new_tokens >= 1 and temperature > 0.')
    if self.p + self.r > config.model.max_len:
      raise ValueError(f'task.max_prompt_len ({self.p}) + task.max_new_tokens ({self.r}) '
                       f'exceeds model.max_len={config.model.max_len}; lower one of them.')
    self.lora = config.peft.method in ('lora', 'qlora')
    # Updates per rollout (TRL: GRPO's num_iterations, PPO's num_ppo_epochs): the trainer
    # calls prepare() once a step and the loss that many times (module docstring).
    self.updates_per_batch = int(_get(config, 'updates_per_batch'))
    self.reward_name = _get(config, 'reward')
    self.reward_fn = rewards_lib.get(self.reward_name)  # fails early on an unknown name
    self.tokenizer = None
    self.prompts: dict[str, list[Prompt]] = {}

  def batch_spec(self):
    b = self.config.train.batch_size
    return dict(prompts=((b, self.p), np.int32), prompt_lengths=((b,), np.int32),
                index=((b,), np.int32), weights=((b,), np.float32))

  def set_tokenizer(self, tokenizer):
    """Loads the prompts of both splits for the host's reward (data_iter does it too)."""
    if self.tokenizer is None:
      self.tokenizer = tokenizer
      self.prompts = {'train': load_prompts(self.config, tokenizer, True),
                      'eval': load_prompts(self.config, tokenizer, False)}
      if isinstance(self.reward_fn, rewards_lib.RewardModel) and \
          self.reward_fn.config.model.vocab_size != self.config.model.vocab_size:
        raise ValueError(f'The reward model {self.reward_name} has a vocabulary of '
                         f'{self.reward_fn.config.model.vocab_size}, the policy '
                         f'{self.config.model.vocab_size}: they need the same tokenizer.')

  def data_iter(self, tokenizer, split, num_batches=None):
    from lm.data import pipeline  # lazy: lm.data imports the tokenizers
    self.set_tokenizer(tokenizer)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    # pylint: disable-next=protected-access  (the pipeline's process sharding)
    index, count, local = pipeline._shard(self.config, None, None)
    prompts = self.prompts['train' if split == 'train' else 'eval']
    if split == 'train':
      return _TrainIter(prompts, self.p, pad, local, index, count,
                        self.config.train.seed % 2**32, self.config.data.shuffle)
    b = self.config.train.batch_size
    n = -(-len(prompts) // b)
    if num_batches:
      n = min(n, num_batches)
    rows = np.arange(n * b)
    rows = np.where(rows < len(prompts), rows, -1)
    return [prompt_batch(prompts, rows[k * b:(k + 1) * b][index::count], self.p, pad)
            for k in range(n)]

  def _trained_base_leaves(self, params) -> dict:
    """LoRA: the base leaves peft.train_also trains too (e.g. the final norm), the value
    head 'classifier' aside: the reference needs their starting values (a small copy)."""
    flat = flax.traverse_util.flatten_dict(params, sep='/')
    also = self.config.peft.train_also
    return {k: jax.tree.map(jnp.copy, v) for k, v in flat.items()  # v may be boxed (init)
            if k.split('/')[-1] not in ('lora_a', 'lora_b') and 'classifier' not in k
            and peft.is_trainable(k, also)}

  def init_extra(self, params):
    if not self._needs_reference():
      return {}
    if self.lora:  # the base with adapters off; a copy of what train_also trains, if any
      leaves = self._trained_base_leaves(params)
      return {'reference_leaves': leaves} if leaves else {}
    return {'reference': jax.tree.map(jnp.copy, params)}

  def _needs_reference(self) -> bool:
    raise NotImplementedError

  def reference_params(self, params, extra):
    if self.lora:
      ref = peft.adapters_off(jax.lax.stop_gradient(params))
      if extra and 'reference_leaves' in extra:
        flat = flax.traverse_util.flatten_dict(ref, sep='/')
        flat.update(extra['reference_leaves'])
        ref = flax.traverse_util.unflatten_dict(flat, sep='/')
      return ref
    return extra['reference']

  # -- rollouts and rewards --

  def _host_rewards(self, split: str):
    """fn(index [N], response ids [N, R], lengths [N]) -> float32 [N, 2] (reward, exact)."""
    def host(index_N, resp_NR, len_N):
      tok, prompts = self.tokenizer, self.prompts[split]
      eos = tok.eos_id
      rows = [i for i, k in enumerate(np.asarray(index_N).tolist()) if k >= 0]
      out = np.zeros((len(index_N), 2), np.float32)
      if not rows:
        return out
      ps = [prompts[int(index_N[i])] for i in rows]
      ids = [[t for t in np.asarray(resp_NR[i, :len_N[i]]).tolist() if t != eos] for i in rows]
      texts = [tok.decode(x) for x in ids]
      if isinstance(self.reward_fn, rewards_lib.RewardModel):
        score = self.reward_fn.score_ids([p.ids + x + ([eos] if eos is not None else [])
                                          for p, x in zip(ps, ids)])
      else:
        score = rewards_lib.score(self.reward_fn, [p.text for p in ps], texts,
                                  [p.reference for p in ps])
      exact = [float(p.reference is not None and t.strip() == p.reference.strip())
               for p, t in zip(ps, texts)]
      out[rows, 0], out[rows, 1] = score, exact
      return out
    return host

  def rollout(self, model, params, batch, rng, split: str, temperature: float, group: int):
    """Samples `group` responses per prompt under stop_gradient(params) and scores them:
    dict of tokens/positions/segments [N, P+R], response [N, R], mask [N, R], length [N],
    reward [N], exact [N], weight [N], sampler_logp [N] (N = B * group)."""
    # pylint: disable=protected-access  (the sampler's jit-compatible internals)
    from lm.infer import sampling
    sg = jax.lax.stop_gradient(params)
    prompts_NP = jnp.repeat(batch['prompts'], group, axis=0)
    lengths_N = jnp.repeat(batch['prompt_lengths'], group, axis=0)
    # (no tokenizer: --compile_only, which runs no data; any id compiles the same program)
    eos = self.tokenizer.eos_id if self.tokenizer is not None else 0
    logits_NV, cache, step, _ = sampling._decoder_start(model, sg, prompts_NP, lengths_N,
                                                        self.r, 1)
    resp_NR, _, score_N = sampling._sample_loop(step, logits_NV, cache, rng,
                                                jnp.float32(temperature),
                                          jnp.float32(1.0), jnp.int32(eos), self.r, 0)
    mask_NR, len_N = response_mask(resp_NR, eos)
    n, p = prompts_NP.shape
    pad_N = p - lengths_N
    col_P = jnp.arange(p)
    seg = jnp.concatenate([(col_P[None] >= pad_N[:, None]).astype(jnp.int32),
                           jnp.ones((n, self.r), jnp.int32)], axis=1)
    pos = jnp.concatenate([jnp.maximum(col_P[None] - pad_N[:, None], 0),
                           lengths_N[:, None] + jnp.arange(self.r)[None]], axis=1)
    index_N = jnp.repeat(batch['index'], group, axis=0)
    scores = jax.pure_callback(self._host_rewards(split),
                               jax.ShapeDtypeStruct((n, 2), jnp.float32), index_N, resp_NR, len_N)
    weight_N = jnp.repeat(batch['weights'], group, axis=0)
    # sampler_logp: the sampler's own sum of the response's log-probs up to EOS (from the
    # untempered logits), a check on the loss's recomputation (equal at temperature 1).
    return dict(tokens=jnp.concatenate([prompts_NP, resp_NR], axis=1), positions=pos,
                segments=seg, response=resp_NR, mask=mask_NR * weight_N[:, None],
                length=len_N, reward=scores[:, 0], exact=scores[:, 1], weight=weight_N,
                sampler_logp=score_N)

  def _apply(self, model, params, ro, rng, deterministic, head='lm'):
    out = model.apply({'params': params}, ro['tokens'], positions_BT=ro['positions'],
                      segment_ids_BT=ro['segments'], deterministic=deterministic,
                      rngs=None if deterministic or rng is None else {'dropout': rng},
                      head=head)
    return out[:, self.p - 1:self.p + self.r - 1]  # the positions that predict the response

  def _logp_entropy(self, model, params, ro, rng, deterministic):
    logits_NRV = self._apply(model, params, ro, rng, deterministic) / self.temperature
    logp_NR = tasks.token_log_probs(logits_NRV, ro['response'])
    logq_NRV = jax.nn.log_softmax(logits_NRV.astype(jnp.float32))
    entropy_NR = -jnp.sum(jnp.exp(logq_NRV) * logq_NRV, axis=-1)
    return logp_NR, entropy_NR

  def prepare(self, model, params, extra, batch, rng):
    """The trainer's hook, once a step: with several updates per rollout, the rollout with
    its old log-probs (ppo: and old values) under the step's starting weights, which every
    update's loss reuses; with one, the batch unchanged (the loss makes the rollout)."""
    del extra
    if self.updates_per_batch == 1:
      return batch  # loss makes the rollout itself (one pass less)
    sg = jax.lax.stop_gradient(params)
    ro = self.rollout(model, sg, batch, rng, 'train', self.temperature, self.g)
    ro['old_logp'] = self._logp_entropy(model, sg, ro, None, True)[0]
    if self.name == 'ppo':
      ro['old_values'] = self._apply(model, sg, ro, None, True, 'token_classify')[..., 0]
    return ro

  def _rollout_for_loss(self, model, params, extra, batch, rng):
    rng_sample, rng_drop = jax.random.split(rng if rng is not None else jax.random.PRNGKey(0))
    if 'response' in batch:  # a trainer that made the rollout already (several updates)
      return batch, rng_drop
    return self.rollout(model, params, batch, rng_sample, 'train', self.temperature,
                        self.g), rng_drop

  # -- eval: greedy responses to held-out prompts --

  def eval_stats(self, model, params, extra, batch):
    del extra
    ro = self.rollout(model, params, batch, jax.random.PRNGKey(0), 'eval', 0.0, 1)  # greedy
    w = ro['weight']
    # EVAL_SAMPLES responses a prompt sampled as in training (a fixed key: the same draws
    # each eval): the policy's expected reward, what RL maximises, with a small error.
    sampled = self.rollout(model, params, batch, jax.random.PRNGKey(1), 'eval',
                           self.temperature, EVAL_SAMPLES)
    return {'reward': jnp.sum(ro['reward'] * w), 'exact': jnp.sum(ro['exact'] * w),
            'length': jnp.sum(ro['length'] * w), 'count': jnp.sum(w),
            'sampled_reward': jnp.sum(sampled['reward'] * sampled['weight']) / EVAL_SAMPLES}

  def eval_metrics(self, stats):
    n = max(stats['count'], 1.0)
    reward = stats['reward'] / n
    return {'eval/loss': -reward, 'eval/reward': reward, 'eval/exact_match': stats['exact'] / n,
            'eval/response_length': stats['length'] / n,
            'eval/sampled_reward': stats['sampled_reward'] / n}


class GRPO(_RL):
  """Group relative policy optimisation (module docstring)."""
  name = 'grpo'

  def __init__(self, config):
    super().__init__(config)
    if self.g < 2:
      raise ValueError('task grpo needs task.num_generations >= 2 (advantages are relative '
                       'to the group).')
    self.beta, self.epsilon = float(_get(config, 'kl_beta')), float(_get(config, 'epsilon'))
    # task.loss_type, shared with DPO as in TRL's configs: its default 'sigmoid' (DPO's)
    # means GRPO's own loss here.
    loss_type = config.task.get('loss_type', 'grpo')
    self.loss_type = 'grpo' if loss_type == 'sigmoid' else loss_type
    if self.loss_type not in ('grpo', 'dr_grpo'):
      raise ValueError(f"task grpo: task.loss_type must be 'grpo' or 'dr_grpo', not "
                       f'{loss_type!r}.')

  def _needs_reference(self):
    return self.beta != 0

  def loss(self, model, params, extra, batch, rng, deterministic):
    ro, rng = self._rollout_for_loss(model, params, extra, batch, rng)
    logp_NR, entropy_NR = self._logp_entropy(model, params, ro, rng, deterministic)
    old_NR = ro.get('old_logp', jax.lax.stop_gradient(logp_NR))
    dr = self.loss_type == 'dr_grpo'
    adv_N = (ro['reward'] - jnp.repeat(ro['reward'].reshape(-1, self.g).mean(1), self.g)
             if dr else group_advantages(ro['reward'], self.g))
    pg_NR, clipped_NR = clipped_policy_loss(logp_NR, old_NR, adv_N[:, None], self.epsilon)
    loss_NR = pg_NR
    if self.beta:
      ref = self.reference_params(params, extra)
      ref_NR, _ = self._logp_entropy(model, jax.lax.stop_gradient(ref), ro, rng, deterministic)
      kl_NR = k3_kl(logp_NR, jax.lax.stop_gradient(ref_NR))
      loss_NR = loss_NR + self.beta * kl_NR
    else:
      kl_NR = jnp.zeros_like(logp_NR)
    mask_NR, w_N = ro['mask'], ro['weight']
    per_seq = lambda x_NR: masked_mean(x_NR, mask_NR, axis=1)  # each response's token mean
    # dr_grpo (Liu et al.'s Dr. GRPO, TRL's loss_type): token sums / max_new_tokens, no
    # length bias (the token mean weighs a long wrong answer's tokens less).
    seq_loss = (lambda x_NR: jnp.sum(x_NR * mask_NR, axis=1) / self.r) if dr else per_seq
    aux = {'reward': jnp.sum(ro['reward'] * w_N), 'exact_match': jnp.sum(ro['exact'] * w_N),
           'kl': jnp.sum(per_seq(kl_NR)), 'entropy': jnp.sum(per_seq(entropy_NR)),
           'response_length': jnp.sum(ro['length'] * w_N),
           'clip_fraction': jnp.sum(per_seq(clipped_NR)),
           # TRL's frac_reward_zero_std: groups whose rewards are all equal teach nothing
           'zero_std_groups': jnp.sum(w_N * jnp.repeat(
               jnp.std(ro['reward'].reshape(-1, self.g), axis=1) == 0, self.g))}
    return jnp.sum(seq_loss(loss_NR)), jnp.sum(w_N), jax.lax.stop_gradient(aux)


class PPO(_RL):
  """PPO with a value head and GAE (module docstring)."""
  name = 'ppo'
  group_default = 1

  def __init__(self, config):
    super().__init__(config)
    if config.model.get('num_labels', 0) != 1:
      raise ValueError('task ppo needs a value head: --config.model.num_labels=1 (the '
                       "decoder's 'classifier', one scalar per position).")
    t = {k: float(_get(config, k)) for k in ('kl_coef', 'cliprange', 'cliprange_value',
                                             'vf_coef', 'gamma', 'lam')}
    self.__dict__.update(t)

  def _needs_reference(self):
    return self.kl_coef != 0

  def loss(self, model, params, extra, batch, rng, deterministic):
    ro, rng = self._rollout_for_loss(model, params, extra, batch, rng)
    logp_NR, entropy_NR = self._logp_entropy(model, params, ro, rng, deterministic)
    values_NR = self._apply(model, params, ro, rng, deterministic, 'token_classify')[..., 0]
    mask_NR, w_N = ro['mask'], ro['weight']
    old_NR = ro.get('old_logp', jax.lax.stop_gradient(logp_NR))
    old_v_NR = ro.get('old_values', jax.lax.stop_gradient(values_NR))
    if self.kl_coef:
      ref = jax.lax.stop_gradient(self.reference_params(params, extra))
      ref_NR, _ = self._logp_entropy(model, ref, ro, rng, deterministic)
      kl_NR = old_NR - ref_NR
    else:
      kl_NR = jnp.zeros_like(logp_NR)
    # The score at the last token, the KL penalty on every token (TRL's rewards).
    last_NR = jax.nn.one_hot(ro['length'] - 1, self.r) * mask_NR
    rewards_NR = -self.kl_coef * kl_NR * mask_NR + ro['reward'][:, None] * last_NR
    adv_NR, returns_NR = gae(rewards_NR, old_v_NR, mask_NR, self.gamma, self.lam)
    adv_NR = jax.lax.stop_gradient(masked_whiten(adv_NR, mask_NR) * mask_NR)
    returns_NR = jax.lax.stop_gradient(returns_NR)
    pg_NR, clipped_NR = clipped_policy_loss(logp_NR, old_NR, adv_NR, self.cliprange)
    pg_loss = masked_mean(pg_NR, mask_NR)
    vf_loss, vf_clip = clipped_value_loss(values_NR, old_v_NR, returns_NR, mask_NR,
                                          self.cliprange_value)
    loss = pg_loss + self.vf_coef * vf_loss
    n = jnp.sum(w_N)
    tok = lambda x_NR: masked_mean(x_NR, mask_NR) * n  # token means, as sums over rows
    aux = {'reward': jnp.sum(ro['reward'] * w_N), 'exact_match': jnp.sum(ro['exact'] * w_N),
           'kl': tok(kl_NR), 'entropy': tok(entropy_NR),
           'response_length': jnp.sum(ro['length'] * w_N), 'clip_fraction': tok(clipped_NR),
           'pg_loss': pg_loss * n, 'value_loss': vf_loss * n, 'value_clip_fraction': vf_clip * n}
    return loss * n, n, jax.lax.stop_gradient(aux)


tasks.register(GRPO)
tasks.register(PPO)
