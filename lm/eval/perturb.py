"""Input perturbations for robustness evaluation: the same task scored on noisy inputs.

A spec is `KIND` or `KIND:RATE` (see KINDS); output depends only on (text, spec, seed), so
a perturbed evaluation can be rerun and compared exactly. Kinds:
- typos:R       each letter, with probability R, gets one of: swapped with the next letter
                (substituted when the next character is not a letter), deleted, followed
                by an inserted random lowercase letter, or replaced by a random lowercase
                letter.
- case:R        each letter's case flipped with probability R.
- whitespace:R  each space doubled with probability R, and a space inserted after each
                letter that is followed by a letter (splitting a word) with probability R.
- upper, lower  the whole text upper- or lower-cased (no rate, no randomness).
"""
from __future__ import annotations

import random
import string

KINDS = ('typos', 'case', 'whitespace', 'upper', 'lower')
_RATED = ('typos', 'case', 'whitespace')
_FORMAT = ('a perturbation is KIND:RATE with KIND one of typos, case, whitespace and RATE '
           'in [0, 1] (e.g. typos:0.05), or one of upper, lower with no rate')


def parse(spec: str) -> tuple[str, float]:
  """'typos:0.05' -> ('typos', 0.05); 'upper' -> ('upper', 1.0)."""
  kind, sep, rate_text = spec.strip().partition(':')
  kind = kind.strip()
  if kind not in KINDS:
    raise ValueError(f'Unknown perturbation {spec!r}: {_FORMAT}.')
  if kind not in _RATED:
    if sep:
      raise ValueError(f'Perturbation {spec!r} takes no rate: {_FORMAT}.')
    return kind, 1.0
  try:
    rate = float(rate_text)
  except ValueError:
    rate = None
  if rate is None or not 0.0 <= rate <= 1.0:  # also NaN, and a missing rate
    raise ValueError(f'Bad rate in perturbation {spec!r}: {_FORMAT}.')
  return kind, rate


def perturb(text: str, spec: str, seed: int) -> str:
  """`text` perturbed as `spec` says, deterministically from `seed`; rate 0 changes nothing."""
  kind, rate = parse(spec)
  if kind == 'upper':
    return text.upper()
  if kind == 'lower':
    return text.lower()
  rng = random.Random(seed)
  hit = lambda: rng.random() < rate
  out = []
  i = 0
  while i < len(text):
    c = text[i]
    nxt = text[i + 1] if i + 1 < len(text) else ''
    if kind == 'typos' and c.isalpha() and hit():
      op = rng.choice(('swap', 'delete', 'insert', 'substitute'))
      if op == 'swap' and nxt.isalpha():
        out += [nxt, c]
        i += 2
        continue
      if op == 'insert':
        out += [c, rng.choice(string.ascii_lowercase)]
      elif op != 'delete':  # substitute, or a swap with no letter to swap with
        out.append(rng.choice(string.ascii_lowercase))
    elif kind == 'case' and c.isalpha() and hit():
      out.append(c.swapcase())
    elif kind == 'whitespace' and c == ' ' and hit():
      out.append('  ')
    elif kind == 'whitespace' and c.isalpha() and nxt.isalpha() and hit():
      out += [c, ' ']
    else:
      out.append(c)
    i += 1
  return ''.join(out)
