"""The encoder and encoder-decoder tasks: masked_lm (BERT masking), span_corruption (T5's
objective, checked against seqio's arithmetic and semantics), classification (labelled
JSON lines; encoder pooled head, decoder last-token head). Each trains, evaluates and
resumes bitwise in the trainer."""
import json

import jax
import numpy as np
import pytest

from lm import models
from lm.config import base_config
from lm.data import labeled
from lm.data.tokenizers import ByteTokenizer
from lm.train import metrics as metrics_lib
from lm.train import tasks, trainer


@pytest.fixture(scope='module', autouse=True)
def _rbg_prng():
  """The rbg PRNG compiles the init several times faster than threefry (compiles are most
  of these tests; tests/conftest.py's session cache covers the repeats). Restored after."""
  old = jax.config.jax_default_prng_impl
  jax.config.update('jax_default_prng_impl', 'rbg')
  yield
  jax.config.update('jax_default_prng_impl', old)


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
  monkeypatch.setattr(metrics_lib, 'plot_losses', lambda workdir: None)  # seconds a run


def train_config(family, task, data_dir, steps=6, **model):
  c = base_config(family)
  c.task.name = task
  c.model.update(vocab_size=0, max_len=32, d_model=32, n_layers=1, n_heads=2)
  c.model.update(model)
  c.data.update(dataset='default', tokenizer='bytes', data_dir=str(data_dir))
  c.train.update(batch_size=8, steps=steps, log_every=1, eval_every=0, eval_steps=2, seed=3)
  c.optimizer.update(warmup_steps=1, lr=1e-2, decay_steps=6)  # the same schedule at any steps
  c.checkpoint.update(every_steps=3, keep=2, async_save=False)
  return c


def encoder_config(task, data_dir):
  """One encoder for masked_lm and classification: their runs share the init executable."""
  c = train_config('encoder', task, data_dir, vocab_size=260, max_positions=32, num_labels=3)
  c.data.user_symbols = ('[MASK]',)
  return c


def check_trains_and_resumes(c, tmp_path):
  """Trains 6 steps (loss falls, eval at the end) and 3 + resume to 6: bitwise equal."""
  one = jax.devices()[:1]
  c.train.eval_every = 6
  once = trainer.train(c, tmp_path / 'once', log=lambda s: None, devices=one)
  c.train.eval_every = 0
  c.train.steps = 3
  trainer.train(c, tmp_path / 'twice', log=lambda s: None, devices=one)
  c.train.steps = 6
  twice = trainer.train(c, tmp_path / 'twice', log=lambda s: None, devices=one)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(once['state']['params']),
               jax.device_get(twice['state']['params']))
  records = metrics_lib.read_metrics(tmp_path / 'once')
  loss = {r['step']: r['train/loss'] for r in records if 'train/loss' in r}
  assert loss[6] < loss[1], loss
  return once, [r for r in records if 'eval/loss' in r][-1]


# -- masked LM --------------------------------------------------------------------------

def mlm_config(**kw):
  c = base_config('encoder')
  c.task.name = 'masked_lm'
  c.model.update(vocab_size=260, max_len=512)
  c.train.batch_size = 64
  c.task.update(kw)
  return c


def test_bert_masking_statistics_and_invariants():
  tok = ByteTokenizer(['[MASK]'])
  mask_id = tok.symbol_id('[MASK]')
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 259, (64, 512)).astype(np.int32)  # bytes and pad/bos/eos
  seg = np.ones_like(tokens)
  seg[:, 400:] = 0  # padding
  seg[:, 100:200] = 2
  batch = dict(inputs=tokens, segment_ids=seg, positions=np.zeros_like(tokens))
  out = tasks.get_task(mlm_config()).batch_transform(tok)(batch, np.random.default_rng(1))
  special = np.isin(tokens, [tok.pad_id, tok.bos_id, tok.eos_id])
  maskable = (seg > 0) & ~special
  selected = out['weights'] > 0
  np.testing.assert_array_equal(out['targets'], tokens)
  assert not (selected & ~maskable).any()  # never padding or a special token
  assert not ((out['inputs'] != tokens) & ~selected).any()  # only selected tokens change
  assert abs(selected.sum() / maskable.sum() - 0.15) < 0.01
  n = selected.sum()
  masked = (out['inputs'] == mask_id) & selected
  replaced = (out['inputs'] != mask_id) & (out['inputs'] != tokens)
  assert abs(masked.sum() / n - 0.8) < 0.015
  assert abs(replaced.sum() / n - 0.1 * 255 / 256) < 0.01  # a random byte may equal the old
  assert abs((out['inputs'] == tokens)[selected].mean() - 0.1) < 0.01
  assert not np.isin(out['inputs'][replaced], [tok.pad_id, tok.bos_id, tok.eos_id,
                                               mask_id]).any()
  again = tasks.get_task(mlm_config()).batch_transform(tok)(batch, np.random.default_rng(1))
  np.testing.assert_array_equal(again['inputs'], out['inputs'])  # the Generator decides


def test_masked_lm_names_the_missing_mask_symbol():
  with pytest.raises(ValueError, match=r"user_symbols=\"\('\[MASK\]',\)\""):
    tasks.get_task(mlm_config()).batch_transform(ByteTokenizer())


def test_masked_lm_trains_evaluates_and_resumes_bitwise(data_dir, tmp_path):
  _, ev = check_trains_and_resumes(encoder_config('masked_lm', data_dir), tmp_path)
  assert set(ev) >= {'eval/loss', 'eval/accuracy', 'eval/perplexity'}
  assert 0 < ev['eval/accuracy'] < 1 and ev['eval/loss'] < np.log(260)


# -- span corruption --------------------------------------------------------------------

def seqio_random_spans_helper(inputs_length, noise_density, mean_noise_span_length):
  """t5.data.preprocessors.random_spans_helper, transcribed (extra tokens per span 1)."""
  def lengths(tokens_length):
    num_noise_tokens = int(round(tokens_length * noise_density))
    num_nonnoise_tokens = tokens_length - num_noise_tokens
    num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
    return (num_nonnoise_tokens + num_noise_spans + 1, num_noise_tokens + num_noise_spans + 1)
  tokens_length = inputs_length - 1
  while lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  return tokens_length, lengths(tokens_length)[1]


def test_span_lengths_match_seqio():
  assert tasks.raw_row_length(512, 0.15, 3.0) == 568  # T5: 568 raw -> 512 inputs, 114 targets
  assert tasks.span_corruption_lengths(568, 0.15, 3.0) == (512, 114)
  for inputs_length in (24, 32, 64, 100, 128, 256, 1024):
    for density, mean in ((0.15, 3.0), (0.3, 8.0), (0.15, 2.0)):
      r, targets = seqio_random_spans_helper(inputs_length, density, mean)
      assert tasks.raw_row_length(inputs_length, density, mean) == r
      assert tasks.span_corruption_lengths(r, density, mean) == (inputs_length, targets)


def runs(mask):
  """Start indices and lengths of the runs of True in a bool vector."""
  edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
  starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
  return starts, ends - starts


def test_noise_mask_has_seqios_noise_and_span_counts():
  rng = np.random.default_rng(0)
  span_lengths = []
  for length in list(range(2, 120)) + [568] * 50:
    mask = tasks.random_spans_noise_mask(length, 0.15, 3.0, rng)
    noise = min(max(int(round(length * 0.15)), 1), length - 1)  # seqio's arithmetic
    spans = max(int(round(noise / 3.0)), 1)
    starts, lens = runs(mask)
    assert mask.sum() == noise and len(starts) == spans, (length, mask)
    assert not mask[0] and mask[-1]  # non-noise first, noise last, as seqio interleaves
    span_lengths += list(lens)
  assert abs(np.mean(span_lengths) - 3.0) < 0.1
  assert tasks.random_spans_noise_mask(1, 0.15, 3.0, rng).tolist() == [False]
  assert tasks.random_spans_noise_mask(0, 0.15, 3.0, rng).shape == (0,)


def t5_config(**model):
  c = base_config('encdec')
  c.task.name = 'span_corruption'
  c.model.update(vocab_size=400, max_len=32, max_target_len=8, decoder_start_id=256)
  c.model.update(model)
  return c


def test_span_corruption_batches_reconstruct_the_rows():
  tok = ByteTokenizer()
  task = tasks.get_task(t5_config())
  r = task.row_length()
  assert r == 34
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (6, r)).astype(np.int32)
  seg = np.ones_like(tokens)
  seg[4, 20:] = 0  # the split's last row is short
  seg[5] = 0  # a padding row
  batch = task.batch_transform(tok)(dict(inputs=tokens, segment_ids=seg),
                                    np.random.default_rng(1))
  assert set(batch) == set(task.batch_spec())
  for k, (shape, dtype) in task.batch_spec().items():
    assert batch[k].shape == (6,) + shape[1:] and batch[k].dtype == dtype, k
  for i in range(6):
    n = int(seg[i].sum())
    enc = batch['encoder_inputs'][i][batch['encoder_segment_ids'][i] > 0]
    dec = batch['decoder_targets'][i][batch['decoder_weights'][i] > 0]
    if n == 0:
      assert len(enc) == len(dec) == 0
      continue
    assert enc[-1] == dec[-1] == tok.eos_id
    noise, spans = tasks.span_counts(n, 0.15, 3.0)
    assert (len(enc), len(dec)) == (n - noise + spans + 1, noise + spans + 1)
    if n == r:
      assert len(enc) == 32  # full rows fill the encoder exactly
    sentinels = [399 - j for j in range(spans)]  # counting down from vocab_size - 1
    assert [t for t in enc if t >= 256 + 3] == sentinels
    assert [t for t in dec if t >= 256 + 3] == sentinels and dec[0] == 399
    # Replace each input sentinel by the target tokens that follow the same sentinel.
    pieces = np.split(dec[:-1], np.flatnonzero(dec[:-1] >= 259)[1:])
    spans_of = {p[0]: list(p[1:]) for p in pieces}
    rebuilt = [t for s in enc[:-1] for t in (spans_of[s] if s >= 259 else [s])]
    np.testing.assert_array_equal(rebuilt, tokens[i, :n])
    dec_in = batch['decoder_inputs'][i][:len(dec)]
    np.testing.assert_array_equal(dec_in, np.concatenate([[256], dec[:-1]]))


def test_span_corruption_errors_name_the_fix():
  with pytest.raises(ValueError, match='max_target_len=8'):
    tasks.get_task(t5_config(max_target_len=7))
  with pytest.raises(ValueError, match='vocab_size=359'):
    tasks.get_task(t5_config(vocab_size=259)).batch_transform(ByteTokenizer())
  tasks.get_task(t5_config(vocab_size=261)).batch_transform(ByteTokenizer())  # 2 spans fit


def test_span_corruption_trains_evaluates_and_resumes_bitwise(data_dir, tmp_path):
  c = train_config('encdec', 'span_corruption', data_dir, vocab_size=320, max_target_len=8,
                   head_dim=16, d_ff=64, decoder_start_id=256)
  _, ev = check_trains_and_resumes(c, tmp_path)
  assert 0 < ev['eval/accuracy'] < 1 and ev['eval/loss'] < np.log(320)


# -- classification ---------------------------------------------------------------------

def write_jsonl(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return path


def sentiment(n, seed=0):
  """Texts whose label is a word in them: a task a tiny model learns in a few steps."""
  rng = np.random.default_rng(seed)
  words = ['good', 'bad', 'meh']
  out = []
  for _ in range(n):
    k = int(rng.integers(3))
    filler = ''.join(rng.choice(list('xyz '), 8))
    out.append({'text': f'{filler} {words[k]} {filler}', 'label': words[k]})
  return out


def cls_config(path, family='encoder', **model):
  c = base_config(family)
  c.task.name = 'classification'
  c.model.update(vocab_size=0, max_len=16, num_labels=3)
  c.model.update(model)
  c.data.update(path=str(path), tokenizer='bytes', val_fraction=0.25)
  c.train.update(batch_size=4, seed=1)
  return c


def test_labelled_records_parse_split_and_map_labels(tmp_path):
  path = write_jsonl(tmp_path / 'a.jsonl', sentiment(8))
  c = cls_config(path)
  assert labeled.label_names(c) == ('bad', 'good', 'meh')  # sorted names of the train split
  train = labeled.split_records(c, 'train')
  assert len(train) == 6 and len(labeled.split_records(c, 'validation')) == 2
  tok = ByteTokenizer()
  ex = labeled.load_examples(c, tok, 'train', ('bad', 'good', 'meh'))
  first = train[0]
  assert ex.labels[0] == ('bad', 'good', 'meh').index(first[2])
  want = [tok.bos_id] + tok.encode(first[0])[:14] + [tok.eos_id]  # no [CLS]: bos a eos
  np.testing.assert_array_equal(ex.inputs[0, :ex.lengths[0]], want)
  # Pairs, int labels, [CLS]/[SEP] with token types, longest-first truncation.
  pairs = write_jsonl(tmp_path / 'p.jsonl', [
      {'text_a': 'a' * 20, 'text_b': 'bb', 'label': 1},
      {'text_a': 'aaa', 'text_b': 'b' * 30, 'label': 0}])
  c2 = cls_config(pairs, num_labels=2)
  c2.data.eval_path = str(pairs)
  assert labeled.label_names(c2) == ()
  tok2 = ByteTokenizer(['[CLS]', '[SEP]'])
  cls_id, sep = tok2.symbol_id('[CLS]'), tok2.symbol_id('[SEP]')
  ex2 = labeled.load_examples(c2, tok2, 'train', ())
  assert ex2.lengths.tolist() == [16, 16] and ex2.labels.tolist() == [1, 0]
  a, b = ord('a'), ord('b')
  assert ex2.inputs[0].tolist() == [cls_id] + [a] * 11 + [sep, b, b, sep]
  assert ex2.token_types[0].tolist() == [0] * 13 + [1] * 3
  assert ex2.inputs[1].tolist() == [cls_id, a, a, a, sep] + [b] * 10 + [sep]
  assert labeled._truncate(20, 2, 13) == (11, 2) and labeled._truncate(7, 7, 9) == (5, 4)


def test_tfds_catalog_classification_reads_its_splits(tmp_path):
  """A TFDS catalog dataset (here a tiny one registered by the test, as glue/sst2 would be
  downloaded) gives the labelled records of its splits, with the named fields."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  class TinySst(tfds.core.GeneratorBasedBuilder):  # registered as 'tiny_sst'
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'sentence': tfds.features.Text(), 'label': tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(6), 'validation': self._generate_examples(2)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {'sentence': f'sentence {i} ' + 'good' * (i % 2), 'label': i % 2}

  c = cls_config('', num_labels=2)
  c.data.update(dataset='tiny_sst', data_dir=str(tmp_path), json_field='sentence')
  train = labeled.split_records(c, 'train')
  assert sorted(train) == sorted((f'sentence {i} ' + 'good' * (i % 2), None, i % 2)
                                 for i in range(6))
  assert len(labeled.split_records(c, 'validation')) == 2 and labeled.label_names(c) == ()
  with pytest.raises(ValueError, match="no split 'test'"):
    labeled.split_records(c, 'test')


def test_labelled_data_errors_are_clear(tmp_path):
  def err(records, match, **model):
    c = cls_config(write_jsonl(tmp_path / 'e.jsonl', records), **model)
    with pytest.raises(ValueError, match=match):
      names = labeled.label_names(c)
      labeled.load_examples(c, ByteTokenizer(), 'train', names)
  good = sentiment(8)
  err(good, r'model.num_labels=2', num_labels=2)
  err([{'text': 'x', 'label': 1}, {'text': 'y', 'label': 'a'}] * 4, 'all ints or all strings')
  err([{'text': 'x', 'label': 5}] * 8, r'num_labels=6')
  err([{'txt': 'x', 'label': 1}] * 8, 'json_field')
  err([{'text': 'x'}] * 8, 'label_field')
  (tmp_path / 'bad.jsonl').write_text('{"text": "x", "label": 1}\nnot json\n')
  with pytest.raises(ValueError, match='bad.jsonl:2 is not valid JSON'):
    labeled.read_records(str(tmp_path / 'bad.jsonl'), cls_config(''))
  c = cls_config(write_jsonl(tmp_path / 'v.jsonl', good))
  c.task.labels = ('bad', 'good')
  with pytest.raises(ValueError, match='num_labels=2'):
    labeled.load_examples(c, ByteTokenizer(), 'train', labeled.label_names(c))
  with pytest.raises(ValueError, match='num_labels > 0'):
    tasks.get_task(cls_config(tmp_path / 'v.jsonl', num_labels=0))


def test_labelled_iterators_shuffle_resume_and_pad(tmp_path):
  c = cls_config(write_jsonl(tmp_path / 'a.jsonl', sentiment(40)))
  names, tok = labeled.label_names(c), ByteTokenizer()
  it = labeled.make_train_iter(c, tok, names, 0, 1)
  first = [next(it) for _ in range(8)]  # 30 train examples: the epoch wraps
  seen = np.concatenate([b['inputs'] for b in first[:7]])
  assert len({x.tobytes() for x in seen[:28]}) > 20  # shuffled examples, not one repeated
  state = it.get_state()
  it2 = labeled.make_train_iter(c, tok, names, 0, 1)
  it2.set_state(state)
  np.testing.assert_array_equal(next(it)['inputs'], next(it2)['inputs'])
  evals = list(labeled.make_eval_iter(c, tok, names, None, 0, 1))  # 10 examples, batch 4
  assert [b['weights'].tolist() for b in evals][-1] == [1, 1, 0, 0]
  assert (evals[-1]['segment_ids'][2:] == 0).all()


def test_classification_trains_evaluates_and_resumes_bitwise(data_dir, tmp_path):
  path = write_jsonl(tmp_path / 'a.jsonl', sentiment(64))
  c = encoder_config('classification', data_dir)
  c.data.update(path=str(path), val_fraction=0.25)
  once, ev = check_trains_and_resumes(c, tmp_path)
  assert set(ev) >= {'eval/loss', 'eval/accuracy', 'eval/f1'} and 0 <= ev['eval/f1'] <= 1
  saved = json.loads((tmp_path / 'once' / 'config.json').read_text())
  assert saved['task']['labels'] == ['bad', 'good', 'meh']  # the mapping travels with the run


def test_macro_f1_is_sklearns():
  task = tasks.get_task(cls_config('', num_labels=4))
  # labels 0 0 1 2, predictions 0 1 1 1: F1 per class 2/3, 1/2, 0 -> macro 7/18 (sklearn's
  # f1_score(average='macro') on these; class 3 never occurs and is left out).
  stats = dict(loss_sum=0.0, weight=4.0, correct=2.0, tp_0=1, fp_0=0, fn_0=1, tp_1=1, fp_1=2,
               fn_1=0, tp_2=0, fp_2=0, fn_2=1, tp_3=0, fp_3=0, fn_3=0)
  m = task.eval_metrics(stats)
  assert m['eval/accuracy'] == 0.5 and abs(m['eval/f1'] - 7 / 18) < 1e-12


def test_decoder_classification_trains_on_the_last_non_pad_token(data_dir, tmp_path):
  path = write_jsonl(tmp_path / 'a.jsonl', sentiment(64))
  c = train_config('decoder', 'classification', data_dir, num_labels=3)
  c.data.update(path=str(path), val_fraction=0.25)
  c.train.eval_every = 6
  out = trainer.train(c, tmp_path / 'dec', log=lambda s: None, devices=jax.devices()[:1])
  records = metrics_lib.read_metrics(tmp_path / 'dec')
  loss = {r['step']: r['train/loss'] for r in records if 'train/loss' in r}
  assert loss[6] < loss[1] and 'eval/f1' in records[-1]
  model, params = out['setup'].model, jax.device_get(out['state']['params'])
  assert params['classifier']['kernel'].shape == (32, 3)
  no_head = out['config'].model.copy_and_resolve_references()
  no_head.num_labels = 0  # no head, no parameter: decoder checkpoints stay as they were
  assert 'classifier' not in models.param_shapes(models.get_model(no_head))
  tokens = np.array([[5, 6, 7, 0, 0, 0, 0, 0], [5, 6, 7, 9, 9, 9, 9, 9]], np.int32)
  seg = np.array([[1, 1, 1, 0, 0, 0, 0, 0]] * 2, np.int32)
  classify = jax.jit(lambda x, seg: model.apply({'params': params}, x, segment_ids_BT=seg,
                                                head='classify'))
  logits = classify(tokens, seg)
  np.testing.assert_allclose(logits[0], logits[1], atol=1e-6)  # padding is never read
  np.testing.assert_allclose(logits[0], classify(tokens[:, :3], None)[0], atol=1e-5)
