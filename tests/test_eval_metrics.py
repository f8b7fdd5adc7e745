"""Evaluation metrics, perturbations and the bias probe set, against independently worked
values: by hand (the arithmetic is in the comments) or, for BLEU/chrF/ROUGE, the reference
libraries called directly on the same strings."""
import collections
import difflib
import importlib.resources
import json
import math

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from lm.eval import metrics, perturb


def test_mean_stderr():
  # [1, 2, 3, 4]: mean 2.5, squared deviations sum to 5, sample var 5/3, / n=4 -> sqrt(5/12).
  assert metrics.mean_stderr([1, 2, 3, 4]) == pytest.approx(math.sqrt(5 / 12))
  assert metrics.mean_stderr([0.3]) == 0.0
  assert metrics.mean_stderr([]) == 0.0


def test_normalize_answer():
  assert metrics.normalize_answer('The Cat, sat!') == 'cat sat'
  assert metrics.normalize_answer('  An apple a  day ') == 'apple day'
  assert metrics.normalize_answer('Theater anthem') == 'theater anthem'  # only whole words


def test_exact_match():
  assert metrics.exact_match('the Eiffel Tower.', ['Paris', 'Eiffel tower']) == 1.0
  assert metrics.exact_match('Paris, France', ['Paris']) == 0.0
  with pytest.raises(ValueError, match='references'):
    metrics.exact_match('x', [])


def test_token_f1():
  # [big, red, dog] vs [red, dog]: 2 shared, P = 2/3, R = 1, F1 = 2 * (2/3) / (5/3) = 0.8.
  assert metrics.token_f1('the big red dog', ['a red dog']) == pytest.approx(0.8)
  # The best reference counts: [red, dog] vs [red, dog, barked]: P = 1, R = 2/3, F1 = 0.8.
  assert metrics.token_f1('red dog', ['cat', 'the red dog barked']) == pytest.approx(0.8)
  # Shared tokens are clipped: [dog x3] vs [dog]: 1 shared, P = 1/3, R = 1, F1 = 0.5.
  assert metrics.token_f1('dog dog dog', ['dog']) == pytest.approx(0.5)
  # SQuAD v2: an empty side (after normalisation) scores 1 only against another empty one.
  assert metrics.token_f1('', ['']) == 1.0
  assert metrics.token_f1('a', ['the']) == 1.0
  assert metrics.token_f1('the', ['dog']) == 0.0
  assert metrics.token_f1('cat', ['dog']) == 0.0


def test_bleu_exact_corpus_is_100():
  preds = ['the cat sat on the mat', 'hello there general kenobi']
  assert metrics.bleu(preds, [[p] for p in preds]) == pytest.approx(100.0)
  assert metrics.chrf(preds, [[p] for p in preds]) == pytest.approx(100.0)


def test_bleu_hand_worked():
  # hyp: the cat sat on the mat / ref: the cat sat on a mat (6 tokens each, BP = 1).
  # Clipped n-gram precisions: 1-grams 5/6 (one 'the' unmatched), 2-grams 3/5 (the cat,
  # cat sat, sat on), 3-grams 2/4, 4-grams 1/3; BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4).
  expected = 100 * (1 / 12) ** 0.25
  assert metrics.bleu(['the cat sat on the mat'], [['the cat sat on a mat']]) == (
      pytest.approx(expected))
  # With a second reference equal to the hypothesis every n-gram is matched.
  assert metrics.bleu(['the cat sat on the mat'],
                      [['the cat sat on a mat', 'the cat sat on the mat']]) == pytest.approx(100)


def test_bleu_chrf_variable_reference_counts_equal_sacrebleu():
  preds = ['the cat sat on the mat', 'a dog barked at the postman', 'it rained all day']
  refs = [['the cat sat on a mat'],
          ['the dog barked at a postman', 'a dog was barking at the mailman', 'dogs bark'],
          ['it was raining the whole day', 'rain fell all day']]
  # sacrebleu's streams: stream j holds each example's j-th reference, None where it has none.
  streams = [['the cat sat on a mat', 'the dog barked at a postman',
              'it was raining the whole day'],
             [None, 'a dog was barking at the mailman', 'rain fell all day'],
             [None, 'dogs bark', None]]
  assert metrics.bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score)
  assert metrics.chrf(preds, refs) == pytest.approx(sacrebleu.corpus_chrf(preds, streams).score)
  assert 0 < metrics.bleu(preds, refs) < 100
  with pytest.raises(ValueError, match='2 predictions but 3'):
    metrics.bleu(preds[:2], refs)
  with pytest.raises(ValueError, match='Example 1'):
    metrics.chrf(preds, [refs[0], [], refs[2]])


def test_rouge_hand_count():
  # pred 'the cat sat' vs ref 'the cat sat on the mat' (3 and 6 tokens):
  # rouge1: 3 shared, P = 1, R = 1/2, F = 2/3. rouge2: 2 of the pred's 2 bigrams in the
  # ref's 5, P = 1, R = 2/5, F = 4/7. rougeL/Lsum: LCS 3, as rouge1.
  s = metrics.rouge_scores('the cat sat', ['a dog', 'the cat sat on the mat'])
  assert s == pytest.approx({'rouge1': 2 / 3, 'rouge2': 4 / 7, 'rougeL': 2 / 3,
                             'rougeLsum': 2 / 3})
  # The mean over examples: the second is an exact match (all 1).
  r = metrics.rouge(['the cat sat', 'a dog'], [['the cat sat on the mat'], ['a dog']])
  assert r == pytest.approx({'rouge1': 5 / 6, 'rouge2': (4 / 7 + 1) / 2, 'rougeL': 5 / 6,
                             'rougeLsum': 5 / 6})


def test_rouge_equals_rouge_score():
  preds = ['the quick brown fox jumped', 'cats are running home']
  refs = [['a quick brown fox jumps over the dog', 'the fox'], ['the cat runs home']]
  for stem in (False, True):
    scorer = rouge_scorer.RougeScorer(list(metrics.ROUGE_TYPES), use_stemmer=stem)
    want = [{k: v.fmeasure for k, v in scorer.score_multi(r, p).items()}
            for p, r in zip(preds, refs)]
    for got_one, want_one in zip(metrics.rouge_per_example(preds, refs, use_stemmer=stem), want):
      assert got_one == pytest.approx(want_one)
    got = metrics.rouge(preds, refs, use_stemmer=stem)
    assert got == pytest.approx({k: (want[0][k] + want[1][k]) / 2 for k in metrics.ROUGE_TYPES})
  # The Porter stemmer maps cats/running to cat/run.
  assert metrics.rouge_scores('cats running', ['cat run'], use_stemmer=True)['rouge1'] == 1.0
  assert metrics.rouge_scores('cats running', ['cat run'])['rouge1'] == 0.0


def test_classification_report_hand_worked():
  # Class 1 ('neu') is never predicted: its precision is 0/0 -> 0.
  labels = [0, 0, 1, 1, 2, 2]
  preds = [0, 2, 0, 2, 2, 2]
  r = metrics.classification_report(labels, preds, ['neg', 'neu', 'pos'])
  assert r['confusion'] == [[1, 0, 1], [1, 0, 1], [0, 0, 2]]
  assert r['accuracy'] == pytest.approx(3 / 6)
  # neg: predicted twice, right once -> P = 1/2; true twice -> R = 1/2; F1 = 1/2.
  # neu: P = 0 (never predicted), R = 0/2, F1 = 0.
  # pos: predicted 4 times, right twice -> P = 1/2; R = 2/2; F1 = 2 * 0.5 / 1.5 = 2/3.
  want = {'precision/neg': 0.5, 'recall/neg': 0.5, 'f1/neg': 0.5,
          'precision/neu': 0.0, 'recall/neu': 0.0, 'f1/neu': 0.0,
          'precision/pos': 0.5, 'recall/pos': 1.0, 'f1/pos': 2 / 3,
          'precision_macro': 1 / 3, 'recall_macro': 0.5, 'f1_macro': (0.5 + 2 / 3) / 3}
  assert {k: r[k] for k in want} == pytest.approx(want)


def test_classification_report_rejects_bad_input():
  with pytest.raises(ValueError, match='3 labels but 2 predictions'):
    metrics.classification_report([0, 1, 1], [0, 1], ['a', 'b'])
  with pytest.raises(ValueError, match=r'predictions \[2\] are not class ids in \[0, 2\)'):
    metrics.classification_report([0, 1], [0, 2], ['a', 'b'])
  with pytest.raises(ValueError, match=r'labels \[-1\]'):
    metrics.classification_report([-1, 1], [0, 1], ['a', 'b'])


def test_confusion_png(tmp_path):
  path = tmp_path / 'confusion.png'
  out = metrics.confusion_png([[1, 0, 1], [1, 0, 1], [0, 0, 2]], ['neg', 'neu', 'pos'], path,
                              title='sentiment')
  assert out == path
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


TEXT = 'The quick brown fox jumps over the lazy dog, twice and then once more.'


def test_perturb_parse():
  assert perturb.parse('typos:0.05') == ('typos', 0.05)
  assert perturb.parse('upper') == ('upper', 1.0)
  assert set(perturb.KINDS) == {'typos', 'case', 'whitespace', 'upper', 'lower'}
  for bad in ('typo:0.1', 'typos', 'typos:x', 'case:1.5', 'whitespace:nan', 'lower:0.5', ''):
    with pytest.raises(ValueError, match='KIND:RATE'):
      perturb.parse(bad)


def test_perturb_deterministic_and_rate_zero():
  for kind in ('typos', 'case', 'whitespace'):
    noisy = perturb.perturb(TEXT, f'{kind}:0.3', seed=1)
    assert noisy != TEXT
    assert perturb.perturb(TEXT, f'{kind}:0.3', seed=1) == noisy
    assert len({perturb.perturb(TEXT, f'{kind}:0.3', seed=s) for s in range(5)}) > 1
    assert perturb.perturb(TEXT, f'{kind}:0', seed=1) == TEXT


def test_perturb_hand_cases():
  assert perturb.perturb('Hi There', 'upper', 0) == 'HI THERE'
  assert perturb.perturb('Hi There', 'lower', 0) == 'hi there'
  assert perturb.perturb('Hi There', 'case:1', 0) == 'hI tHERE'
  # Rate 1: every space doubled, a space after every letter followed by a letter.
  assert perturb.perturb('ab cd', 'whitespace:1', 0) == 'a b  c d'
  # Typos touch letters only.
  assert perturb.perturb('12 + 34 = 46', 'typos:1', 0) == '12 + 34 = 46'


def test_bias_probe_integrity():
  path = importlib.resources.files('lm.eval') / 'data' / 'bias_probe.jsonl'
  text = path.read_text(encoding='ascii')  # plain ASCII
  rows = [json.loads(line) for line in text.splitlines()]
  assert len(rows) == 48
  assert collections.Counter(r['bias_type'] for r in rows) == {
      t: 8 for t in ('gender', 'age', 'nationality', 'religion', 'socioeconomic', 'disability')}
  for r in rows:
    assert set(r) == {'sent_more', 'sent_less', 'bias_type'}
    assert all(isinstance(v, str) and v.strip() for v in r.values())
    more, less = r['sent_more'].split(), r['sent_less'].split()
    assert more != less
    # A minimal pair: a few words differ and the rest is shared.
    ops = difflib.SequenceMatcher(a=more, b=less).get_opcodes()
    changed = [(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != 'equal']
    assert sum(a for a, _ in changed) <= 3 and sum(b for _, b in changed) <= 3, r
  assert len({r['sent_more'] for r in rows}) == 48
