"""The embedded default fine-tuning set: short tasks with answers that can be checked exactly.

Made deterministically by the package (no network, no files), so a fine-tuning run shows a
real before/after on held-out examples. Four kinds, in turn:
  add: 37 + 58              -> 95
  reverse: red cat blue     -> blue cat red
  sort: pear fig apple      -> apple fig pear
  field age of: user(name='bob', age=31, city='rome')  -> 31
Each prompt ends with a newline (the cue to answer: records are plain prompt/completion
text, lm/data/instruct.py) and every example stays under 64 bytes, so it suits a small model
on the bytes tokenizer with a context of 128-256.

make(num_train, num_eval, seed) draws one stream of distinct prompts from `seed`: the first
num_eval are the eval examples, the next num_train the training ones, so eval prompts never
occur in training and the eval set does not change with num_train.

    python -m lm.data.finetune_sets --out=DIR [--train=4000 --eval=200 --seed=0]
writes DIR/train.jsonl and DIR/eval.jsonl.
"""
from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

WORDS = ('ant', 'bee', 'cat', 'dog', 'elk', 'fox', 'hen', 'owl', 'pig', 'yak',
         'red', 'blue', 'green', 'pink', 'gold', 'gray', 'tan',
         'apple', 'fig', 'kiwi', 'lime', 'pear', 'plum', 'date', 'grape',
         'sun', 'moon', 'star', 'rain', 'snow', 'wind', 'tree', 'leaf', 'rock', 'sand')
NAMES = ('ann', 'bob', 'cal', 'dee', 'eve', 'fay', 'gus', 'hal', 'ivy', 'jon', 'kim', 'lou',
         'max', 'ned', 'pam', 'ray', 'sue', 'tom', 'zoe')
CITIES = ('rome', 'oslo', 'lima', 'kyiv', 'riga', 'bern', 'doha', 'nice', 'york', 'cork')
KINDS = ('add', 'reverse', 'sort', 'field')


def _words(rng: np.random.Generator) -> list[str]:
  return [WORDS[i] for i in rng.choice(len(WORDS), int(rng.integers(3, 6)), replace=False)]


def example(kind: str, rng: np.random.Generator) -> dict[str, str]:
  """One {"prompt", "completion"} of `kind`."""
  if kind == 'add':
    a, b = (int(x) for x in rng.integers(0, 100, 2))
    return dict(prompt=f'add: {a} + {b}\n', completion=str(a + b))
  if kind == 'reverse':
    w = _words(rng)
    return dict(prompt=f'reverse: {" ".join(w)}\n', completion=' '.join(reversed(w)))
  if kind == 'sort':
    w = _words(rng)
    return dict(prompt=f'sort: {" ".join(w)}\n', completion=' '.join(sorted(w)))
  if kind == 'field':
    values = dict(name=NAMES[rng.integers(len(NAMES))], age=str(int(rng.integers(18, 90))),
                  city=CITIES[rng.integers(len(CITIES))])
    field = ('name', 'age', 'city')[rng.integers(3)]
    line = f"user(name='{values['name']}', age={values['age']}, city='{values['city']}')"
    return dict(prompt=f'field {field} of: {line}\n', completion=values[field])
  raise ValueError(f'Unknown kind {kind!r}; known: {KINDS}.')


def make(num_train: int, num_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
  """(train, eval) lists of {"prompt", "completion"}, prompts all distinct."""
  rng = np.random.default_rng([seed, 20261206])
  out, seen, total = [], set(), num_train + num_eval
  tries = 0
  while len(out) < total:
    tries += 1
    if tries > 20 * total + 1000:
      raise ValueError(f'The embedded set has too few distinct prompts for {total} examples; '
                       'lower task.finetune_examples / task.finetune_eval.')
    ex = example(KINDS[len(out) % len(KINDS)], rng)
    if ex['prompt'] not in seen:
      seen.add(ex['prompt'])
      out.append(ex)
  return out[num_eval:], out[:num_eval]


def write(out_dir, num_train: int = 4000, num_eval: int = 200, seed: int = 0) -> None:
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  for name, records in zip(('train', 'eval'), make(num_train, num_eval, seed)):
    (out / f'{name}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', required=True, help='directory for train.jsonl and eval.jsonl')
  p.add_argument('--train', type=int, default=4000)
  p.add_argument('--eval', type=int, default=200)
  p.add_argument('--seed', type=int, default=0)
  a = p.parse_args(argv)
  write(a.out, a.train, a.eval, a.seed)
  print(f'Wrote {a.out}/train.jsonl ({a.train}) and {a.out}/eval.jsonl ({a.eval}).')


if __name__ == '__main__':
  main()
