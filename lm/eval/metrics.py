"""Metrics for evaluation tasks, matching the reference implementations people compare with.

EM and token F1 follow the official SQuAD scripts; BLEU and chrF are sacrebleu's corpus
scores (0-100) and ROUGE is Google's rouge-score (F-measures, 0-1), so our figures equal the
ones papers report for the same strings. mean_stderr is lm-eval-harness' stderr of a mean.
sacrebleu, rouge-score and matplotlib are imported where used, keeping this module cheap to
import.
"""
from __future__ import annotations

import collections
import functools
import math
import numbers
import re
import string
from collections.abc import Sequence

ROUGE_TYPES = ('rouge1', 'rouge2', 'rougeL', 'rougeLsum')


def mean_stderr(values: Sequence[float]) -> float:
  """Standard error of the mean: sample std (ddof=1) / sqrt(n); 0.0 for n < 2."""
  n = len(values)
  if n < 2:
    return 0.0
  mu = sum(values) / n
  return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


# --- SQuAD exact match and token F1 -------------------------------------------------------

_ARTICLES = re.compile(r'\b(a|an|the)\b', re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
  """SQuAD's normalisation: lower case, drop punctuation and articles, squeeze whitespace."""
  s = ''.join(ch for ch in s.lower() if ch not in _PUNCTUATION)
  return ' '.join(_ARTICLES.sub(' ', s).split())


def _check_refs(references: Sequence[str]) -> None:
  if isinstance(references, str) or not references:
    raise ValueError(f'references must be a non-empty list of strings, got {references!r}.')


def exact_match(prediction: str, references: Sequence[str]) -> float:
  """1.0 when the normalised prediction equals any normalised reference, else 0.0."""
  _check_refs(references)
  pred = normalize_answer(prediction)
  return float(any(pred == normalize_answer(r) for r in references))


def _f1(prediction: str, reference: str) -> float:
  pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
  if not pred or not ref:  # SQuAD v2: an empty side scores 1 only against another empty one
    return float(pred == ref)
  same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(ref)
  return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str]) -> float:
  """SQuAD token-overlap F1 after normalize_answer, the best over references."""
  _check_refs(references)
  return max(_f1(prediction, r) for r in references)


# --- BLEU, chrF (sacrebleu) ---------------------------------------------------------------

def _streams(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[list]:
  """Per-example reference lists -> sacrebleu's reference streams (stream j holds every
  example's j-th reference). Examples with fewer references are padded with None, which
  sacrebleu drops per segment (an empty string would count as a real, empty reference)."""
  if len(predictions) != len(references):
    raise ValueError(f'{len(predictions)} predictions but {len(references)} reference lists.')
  if not predictions:
    raise ValueError('Nothing to score: no predictions.')
  for i, refs in enumerate(references):
    if isinstance(refs, str) or not refs:
      raise ValueError(f'Example {i}: references must be a non-empty list of strings, '
                       f'got {refs!r}.')
  width = max(len(r) for r in references)
  return [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """sacrebleu's corpus BLEU (0-100, default 13a tokenisation); references[i] lists
  example i's references, any number of them."""
  import sacrebleu
  return sacrebleu.corpus_bleu(list(predictions), _streams(predictions, references)).score


def chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """sacrebleu's corpus chrF (0-100), references as for bleu."""
  import sacrebleu
  return sacrebleu.corpus_chrf(list(predictions), _streams(predictions, references)).score


# --- ROUGE (rouge-score) ------------------------------------------------------------------

@functools.cache
def _rouge_scorer(use_stemmer: bool):
  from rouge_score import rouge_scorer
  return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)


def rouge_scores(prediction: str, references: Sequence[str],
                 use_stemmer: bool = False) -> dict[str, float]:
  """One example's rouge1/2/L/Lsum F-measures (0-1), each the best over references
  (RougeScorer.score_multi). rouge-score's default tokeniser keeps only [a-z0-9] runs."""
  _check_refs(references)
  scores = _rouge_scorer(use_stemmer).score_multi(list(references), prediction)
  return {k: float(scores[k].fmeasure) for k in ROUGE_TYPES}


def rouge_per_example(predictions: Sequence[str], references: Sequence[Sequence[str]],
                      use_stemmer: bool = False) -> list[dict[str, float]]:
  """rouge_scores for each example (for per-example samples and their stderr)."""
  if len(predictions) != len(references):
    raise ValueError(f'{len(predictions)} predictions but {len(references)} reference lists.')
  return [rouge_scores(p, r, use_stemmer) for p, r in zip(predictions, references)]


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]],
          use_stemmer: bool = False) -> dict[str, float]:
  """Mean over examples of rouge_scores."""
  rows = rouge_per_example(predictions, references, use_stemmer)
  if not rows:
    raise ValueError('Nothing to score: no predictions.')
  return {k: sum(r[k] for r in rows) / len(rows) for k in ROUGE_TYPES}


# --- Classification -----------------------------------------------------------------------

def classification_report(labels: Sequence[int], predictions: Sequence[int],
                          names: Sequence[str]) -> dict:
  """accuracy; macro and per-class (`precision/NAME`, ...) precision, recall and F1, a
  class never predicted or never present scoring 0 (sklearn's zero_division=0); and
  `confusion`, rows the true label, columns the predicted one."""
  k = len(names)
  if len(labels) != len(predictions):
    raise ValueError(f'{len(labels)} labels but {len(predictions)} predictions.')
  if len(labels) == 0:
    raise ValueError('Nothing to score: no labels.')
  for what, xs in (('label', labels), ('prediction', predictions)):
    bad = [x for x in xs if not (isinstance(x, numbers.Integral) and 0 <= x < k)]
    if bad:
      raise ValueError(f'{what}s {bad[:5]} are not class ids in [0, {k}) '
                       f'for classes {list(names)}.')
  confusion = [[0] * k for _ in range(k)]
  for y, p in zip(labels, predictions):
    confusion[int(y)][int(p)] += 1
  out = {'accuracy': sum(confusion[c][c] for c in range(k)) / len(labels)}
  div = lambda a, b: a / b if b else 0.0
  per = {'precision': [], 'recall': [], 'f1': []}
  for c, name in enumerate(names):
    tp = confusion[c][c]
    precision = div(tp, sum(row[c] for row in confusion))
    recall = div(tp, sum(confusion[c]))
    f1 = div(2 * precision * recall, precision + recall)
    for metric, v in (('precision', precision), ('recall', recall), ('f1', f1)):
      out[f'{metric}/{name}'] = v
      per[metric].append(v)
  for metric, vs in per.items():
    out[f'{metric}_macro'] = sum(vs) / k
  out['confusion'] = confusion
  return out


def confusion_png(confusion: Sequence[Sequence[int]], names: Sequence[str], path, title: str = ''):
  """A heatmap of the confusion matrix with the count in each cell, written as a PNG."""
  import numpy as np
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  m = np.asarray(confusion)
  size = 1.5 + 0.6 * len(names)
  fig = Figure(figsize=(size + 1, size))
  FigureCanvasAgg(fig)  # no pyplot: no global state, no display needed
  ax = fig.add_subplot()
  im = ax.imshow(m, cmap='Blues')
  fig.colorbar(im, ax=ax)
  ticks = range(len(names))
  ax.set_xticks(ticks, labels=names, rotation=45, ha='right')
  ax.set_yticks(ticks, labels=names)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  if title:
    ax.set_title(title)
  high = m.max() / 2 if m.size else 0
  for (i, j), v in np.ndenumerate(m):
    ax.text(j, i, str(v), ha='center', va='center', color='white' if v > high else 'black')
  fig.tight_layout()
  fig.savefig(path, format='png')
  return path
