"""Rewards for RL from feedback (tasks grpo and ppo, lm/train/rl.py).

A reward is a Python function fn(prompt: str, response: str, reference: str | None) ->
float over text: the prompt as the policy saw it, the sampled response (stripped, cut at
EOS) and the record's reference answer (None when the data has none). Register one by name
and pick it with task.reward:

    from lm.train import rewards

    @rewards.register('has_digit')
    def has_digit(prompt, response, reference):
      return float(any(c.isdigit() for c in response))

Built in: 'exact_match' (1.0 when the response equals the reference, else 0.0) and
'partial_match' (exact match 1.0, else 0.5 * the share of the reference's words the response
has at the right place: partial credit for near misses, so early groups differ in reward).

A reward model (a decoder with model.num_labels=1 trained by task 'reward', lm/train/
align.py) gives rewards too: task.reward='rm:RUN_DIR'; reward_model(RUN_DIR) loads it
(lm.infer.load.load_run) and scores prompt + response token ids with its scalar head on the
last token. Both kinds run on the host (rl.py calls them through jax.pure_callback).

score() calls a reward over a batch; a function that raises stops the run with an error
naming the prompt (RewardError).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

RewardFn = Callable[[str, str, 'str | None'], float]
_REGISTRY: dict[str, RewardFn] = {}


class RewardError(RuntimeError):
  """A reward function failed on a rollout; the message names the prompt."""


def register(name: str):
  """Decorator: registers fn(prompt, response, reference) -> float under `name`."""
  def add(fn: RewardFn) -> RewardFn:
    _REGISTRY[name] = fn
    return fn
  return add


def known() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str) -> RewardFn:
  """The reward function registered as `name`, or 'rm:RUN_DIR' (a reward model's)."""
  if name.startswith('rm:'):
    return reward_model(name[3:])
  if name not in _REGISTRY:
    raise ValueError(f'Unknown reward {name!r}; known: {", ".join(known())}, or rm:RUN_DIR '
                     '(a reward model run). Register others with lm.train.rewards.register.')
  return _REGISTRY[name]


def _need_reference(name: str, reference):
  if reference is None:
    raise ValueError(f'reward {name} needs a reference answer: give the records a '
                     '"completion" (or an assistant turn).')


@register('exact_match')
def exact_match(prompt: str, response: str, reference: str | None) -> float:
  """1.0 when the stripped response equals the stripped reference, else 0.0."""
  del prompt
  _need_reference('exact_match', reference)
  return float(response.strip() == reference.strip())


@register('partial_match')
def partial_match(prompt: str, response: str, reference: str | None) -> float:
  """1.0 for an exact match, else 0.5 * (reference words matched in place) / (the larger
  word count): a graded signal for answers of several words."""
  del prompt
  _need_reference('partial_match', reference)
  got, want = response.strip().split(), reference.strip().split()
  if got == want:
    return 1.0
  same = sum(a == b for a, b in zip(got, want))
  return 0.5 * same / max(len(got), len(want), 1)


def score(fn: RewardFn, prompts: list[str], responses: list[str],
          references: list[str | None]) -> np.ndarray:
  """float32 [N] rewards; a function that raises (or returns a non-number, NaN or inf) stops
  with RewardError naming the prompt."""
  out = np.zeros(len(prompts), np.float32)
  for i, (p, r, ref) in enumerate(zip(prompts, responses, references)):
    try:
      value = float(fn(p, r, ref))
    except Exception as e:  # pylint: disable=broad-except  (any user code)
      raise RewardError(f'The reward function {getattr(fn, "__name__", fn)!r} raised '
                        f'{type(e).__name__}: {e} on the prompt {p!r} (response {r!r}).') from e
    if not np.isfinite(value):
      raise RewardError(f'The reward function {getattr(fn, "__name__", fn)!r} returned '
                        f'{value} on the prompt {p!r} (response {r!r}); rewards must be finite.')
    out[i] = value
  return out


class RewardModel:
  """A reward model run (model.num_labels=1): scores token ids with its scalar head.

  Callable as a reward function over text (it encodes prompt + response the way the policy
  saw them: the bytes of the text, EOS last), or over ids with score_ids. Rows are padded to
  the model's context (one compilation)."""

  def __init__(self, workdir: str):
    import jax
    import jax.numpy as jnp
    from lm.infer import load  # lazy: loading builds models
    from lm.train import checkpoint
    labels = checkpoint.read_config(workdir).model.get('num_labels', 0)
    if labels != 1:
      raise ValueError(f'{workdir} is not a reward model (model.num_labels={labels}, not 1); '
                       'train one with task reward.')
    self.model, self.params, self.config, self.tokenizer = load.load_run(workdir)
    self.__name__ = f'rm:{workdir}'
    self.max_len = self.config.model.max_len
    model = self.model

    @jax.jit
    def forward(params, tokens_BT, seg_BT):
      return model.apply({'params': params}, tokens_BT, segment_ids_BT=seg_BT,
                         head='classify')[:, 0]
    self._forward = forward
    self._jnp = jnp

  def score_ids(self, rows: list[list[int]], batch_size: int = 32) -> np.ndarray:
    """float32 [N]: the scalar head on the last token of each row (its last max_len)."""
    out = []
    pad = self.tokenizer.pad_id or 0
    for i in range(0, len(rows), batch_size):
      chunk = [r[-self.max_len:] for r in rows[i:i + batch_size]]
      tokens = np.full((batch_size, self.max_len), pad, np.int32)
      seg = np.zeros_like(tokens)
      for j, r in enumerate(chunk):
        tokens[j, :len(r)], seg[j, :len(r)] = r, 1
      scores = np.asarray(self._forward(self.params, self._jnp.asarray(tokens),
                                        self._jnp.asarray(seg)))
      out.append(scores[:len(chunk)])
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

  def __call__(self, prompt: str, response: str, reference: str | None = None) -> float:
    del reference
    from lm.infer import sampling
    ids = sampling.encode_prompt(self.tokenizer, prompt) + self.tokenizer.encode(response)
    if self.tokenizer.eos_id is not None:
      ids.append(self.tokenizer.eos_id)
    return float(self.score_ids([ids])[0])


_MODELS: dict[str, RewardModel] = {}


def reward_model(workdir: str) -> RewardModel:
  """The reward model of a run directory, loaded once per process."""
  if workdir not in _MODELS:
    _MODELS[workdir] = RewardModel(workdir)
  return _MODELS[workdir]
