"""Builds preference pairs automatically (contrastive post-training) as JSON lines.

  # a stronger and a weaker run: greedy answers, the stronger's chosen
  python scripts/make_preferences.py --strong=runs/ft_full --weak=runs/quickstart \
      --out=prefs.jsonl
  # the reference answers against a run's own greedy mistakes (on-policy rejections)
  python scripts/make_preferences.py --strong=reference --weak=runs/ft_full --out=prefs.jsonl
  # N samples of one run ranked by a reward function (lm/train/rewards.py) or a reward model
  python scripts/make_preferences.py --policy=runs/ft_full --num_samples=4 \
      --reward_fn=exact_match --out=prefs.jsonl
  python scripts/make_preferences.py --policy=runs/ft_full --num_samples=4 \
      --reward_model=runs/reward --out=prefs.jsonl

Prompts: --prompts=FILE.jsonl of {"prompt"} or instruction records ({"prompt",
"completion"} / {"messages"}: the prompt is everything before the last assistant turn,
as task sft prompts it; "completion" / "reference" / the last assistant turn is the
reference a reward function gets), or "" for the embedded fine-tuning set's training
prompts (--split=eval: its held-out ones) with their correct answers as references.
Pairs whose two answers are equal, and samples whose rewards tie, are dropped and counted.
Writes {"prompt", "chosen", "rejected"} (or {"messages", "chosen", "rejected"}) lines, the
format of lm/data/preferences.py, and prints one JSON summary line.
"""
from __future__ import annotations

import json

from absl import app, flags

_OUT = flags.DEFINE_string('out', None, 'The preference JSON-lines file to write.')
_STRONG = flags.DEFINE_string('strong', '', 'Run directory of the stronger model (chosen), '
                              'or "reference": each prompt\'s reference answer.')
_WEAK = flags.DEFINE_string('weak', '', 'Run directory of the weaker model (rejected).')
_POLICY = flags.DEFINE_string('policy', '', 'Run directory whose samples are ranked.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 4, 'Samples per prompt (with --policy).')
_REWARD_FN = flags.DEFINE_string('reward_fn', '', 'A reward function by name '
                                 '(lm.train.rewards.get), e.g. exact_match.')
_REWARD_MODEL = flags.DEFINE_string('reward_model', '', 'Run directory of a reward model '
                                    '(task reward: model.num_labels=1).')
_PROMPTS = flags.DEFINE_string('prompts', '', 'JSON lines of prompts ("": the embedded set).')
_SPLIT = flags.DEFINE_enum('split', 'train', ['train', 'eval'], 'The embedded set\'s split.')
_NUM = flags.DEFINE_integer('num', 0, 'Prompts to use (0: all).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 32, 'Tokens per answer at most.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Sampling temperature (--policy).')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Top-k sampling (0: off).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_BATCH = flags.DEFINE_integer('batch_size', 256, 'Rows per generate call.')


def read_prompts(path: str, split: str, num: int) -> list[dict]:
  """[{"prompt": str} or {"messages": list}, "reference": str | None}]."""
  from lm.data import finetune_sets, instruct, sources
  out = []
  if not path:
    from lm.config import base_config
    t = base_config().task
    examples = finetune_sets.make(t.finetune_examples, t.finetune_eval)[split == 'eval']
    out = [dict(prompt=e['prompt'], reference=e['completion']) for e in examples]
  else:
    for where, r in sources.json_records(path):
      if isinstance(r, dict) and isinstance(r.get('messages'), list):
        msgs = instruct.parse_record(r, where).messages
        last = max((i for i, m in enumerate(msgs) if m['role'] == 'assistant'), default=None)
        context = msgs if last is None else msgs[:last]
        ref = None if last is None else msgs[last]['content']
        out.append(dict(messages=context, reference=r.get('reference', ref)))
      elif isinstance(r, dict) and isinstance(r.get('prompt'), str):
        out.append(dict(prompt=r['prompt'],
                        reference=r.get('reference', r.get('completion'))))
      else:
        raise ValueError(f'{where} has neither "prompt" nor "messages"; one prompt a line.')
  if not out:
    raise ValueError(f'No prompts in {path!r}.')
  return out[:num] if num else out


class Run:
  """A loaded run: its prompts' token ids and text generation."""

  def __init__(self, workdir):
    from lm.data import instruct
    from lm.infer.load import load_run
    self.workdir = workdir
    self.model, self.params, self.config, self.tokenizer = load_run(workdir)
    self._template = []
    self.instruct = instruct

  def template(self):
    if not self._template:
      self._template.append(self.instruct.chat_template(self.config, self.tokenizer))
    return self._template[0]

  def encode(self, item: dict, response: str | None = None) -> list[int]:
    """The prompt's ids (response=None) or the prompt + response + EOS ids, as task sft
    and lm/data/preferences.py tokenise them."""
    instruct, text = self.instruct, 'x' if response is None else response
    if 'messages' in item:
      record = instruct.Record('prompt', messages=item['messages'] + [
          dict(role='assistant', content=text)])
    else:
      record = instruct.Record('prompt', prompt=item['prompt'], completion=text)
    prompt, target = instruct.prompt_and_target(record, self.tokenizer, self.template)
    return prompt if response is None else prompt + target

  def generate(self, items: list[dict], copies: int, temperature: float) -> list[list[str]]:
    """`copies` answers (text, EOS dropped) per item."""
    from lm.infer import sampling
    prompts = [self.encode(item) for item in items for _ in range(copies)]
    tok, texts = self.tokenizer, []
    for i in range(0, len(prompts), _BATCH.value):
      outs = sampling.generate(self.model, self.params, prompts[i:i + _BATCH.value],
                               max_new_tokens=_MAX_NEW.value, temperature=temperature,
                               top_k=_TOP_K.value, seed=_SEED.value + i,
                               eos_id=tok.eos_id, pad_id=tok.pad_id or 0)
      texts += [tok.decode(o[:-1] if o and o[-1] == tok.eos_id else o) for o in outs]
    return [texts[i:i + copies] for i in range(0, len(texts), copies)]

  def rewards(self, item: dict, responses: list[str]) -> list[float]:
    """A reward model's scalar for each response (its classifier on the last token)."""
    import jax
    import numpy as np
    if not hasattr(self, '_score'):
      self._score = jax.jit(lambda p, x, s: self.model.apply(
          {'params': p}, x, segment_ids_BT=s, head='classify')[:, 0])
    rows = [self.encode(item, r) for r in responses]
    t = self.config.model.max_len
    x = np.zeros((len(rows), t), np.int32)
    s = np.zeros((len(rows), t), np.int32)
    for i, ids in enumerate(rows):
      ids = ids[-t:]  # the end (the answer) matters most to a reward read on the last token
      x[i, :len(ids)], s[i, :len(ids)] = ids, 1
    return [float(v) for v in np.asarray(self._score(self.params, x, s))]


def pair_record(item: dict, chosen: str, rejected: str) -> dict:
  key = 'messages' if 'messages' in item else 'prompt'
  return {key: item[key], 'chosen': chosen, 'rejected': rejected}


def from_two_runs(items, strong, weak: Run):
  """(pairs, counts): the stronger run's greedy answer (strong='reference': the prompt's
  reference answer) chosen, the weaker's rejected."""
  chosen = ([[item['reference']] for item in items] if strong == 'reference' else
            strong.generate(items, 1, 0.0))
  if strong == 'reference' and any(c[0] is None for c in chosen):
    raise ValueError('--strong=reference needs a reference answer for every prompt '
                     '("completion" / "reference" / the last assistant turn).')
  rejected = weak.generate(items, 1, 0.0)
  pairs, equal, empty = [], 0, 0
  for item, (c,), (r,) in zip(items, chosen, rejected):
    if c == r:
      equal += 1
    elif not c.strip() or not r.strip():
      empty += 1
    else:
      pairs.append(pair_record(item, c, r))
  return pairs, dict(dropped_equal=equal, dropped_empty=empty)


def from_ranked_samples(items, policy: Run, score):
  """(pairs, counts): of each prompt's samples, the highest scored chosen, the lowest
  rejected; prompts whose best and worst tie (or whose answers are all equal) dropped."""
  samples = policy.generate(items, _NUM_SAMPLES.value, _TEMPERATURE.value)
  pairs, ties, empty = [], 0, 0
  for item, answers in zip(items, samples):
    answers = [a for a in answers if a.strip()]
    if len(set(answers)) < 2:
      empty += 1 if not answers else 0
      ties += 1 if answers else 0
      continue
    scores = score(item, answers)
    hi, lo = max(range(len(answers)), key=scores.__getitem__), min(
        range(len(answers)), key=scores.__getitem__)
    if scores[hi] == scores[lo] or answers[hi] == answers[lo]:
      ties += 1
      continue
    pairs.append(pair_record(item, answers[hi], answers[lo]))
  return pairs, dict(dropped_ties=ties, dropped_empty=empty)


def reward_fn_scorer(name: str):
  from lm.train import rewards  # lazy: the RL side's registry of reward functions
  fn = rewards.get(name)

  def score(item, answers):
    prompt = item.get('prompt') or json.dumps(item['messages'])
    out = []
    for a in answers:
      try:
        out.append(float(fn(prompt, a, item.get('reference'))))
      except Exception as e:  # pylint: disable=broad-except  (named, then stopped)
        raise RuntimeError(f'Reward function {name!r} raised on the prompt {prompt!r} '
                           f'(response {a!r}): {e!r}') from e
    return out
  return score


def main(argv):
  del argv
  two = bool(_STRONG.value or _WEAK.value)
  if two == bool(_POLICY.value) or (two and not (_STRONG.value and _WEAK.value)):
    raise app.UsageError('Give either --strong and --weak, or --policy (with --reward_fn or '
                         '--reward_model).')
  items = read_prompts(_PROMPTS.value, _SPLIT.value, _NUM.value)
  if two:
    strong = 'reference' if _STRONG.value == 'reference' else Run(_STRONG.value)
    pairs, counts = from_two_runs(items, strong, Run(_WEAK.value))
  else:
    if bool(_REWARD_FN.value) == bool(_REWARD_MODEL.value):
      raise app.UsageError('--policy needs one of --reward_fn or --reward_model.')
    if _NUM_SAMPLES.value < 2:
      raise app.UsageError('--num_samples must be at least 2 to rank samples.')
    if _REWARD_FN.value:
      score = reward_fn_scorer(_REWARD_FN.value)
    else:
      reward = Run(_REWARD_MODEL.value)
      if reward.config.model.get('num_labels', 0) != 1:
        raise app.UsageError(f'{_REWARD_MODEL.value} is not a reward model (task reward, '
                             'model.num_labels=1).')
      score = reward.rewards
    pairs, counts = from_ranked_samples(items, Run(_POLICY.value), score)
  with open(_OUT.value, 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(p) + '\n' for p in pairs)
  print(json.dumps({'out': _OUT.value, 'prompts': len(items), 'pairs': len(pairs), **counts}))


if __name__ == '__main__':
  flags.mark_flag_as_required('out')
  app.run(main)
