"""Datasets and the Grain pipeline: splits, packing, determinism, resume, sharding, bad input."""
import json
import logging
import random

import numpy as np
import pytest

from lm.config import base_config
from lm.data import pipeline
from lm.data import sources
from lm.data import tokenizers as tk


def make_config(tmp_path, max_len=16, batch_size=4, **data):
  config = base_config()
  config.data.update(dict(dict(dataset='text_files', data_dir=str(tmp_path / 'tfds')), **data))
  config.model.max_len = max_len
  config.train.batch_size = batch_size
  return config


def random_text(n, seed=0):
  rng = random.Random(seed)
  return ''.join(rng.choice('abcdefghij klmnopqrstuvwxyz\n') for _ in range(n))


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# -- sources ---------------------------------------------------------------------------

def test_single_file_split_by_position(tmp_path):
  text = random_text(1000) + 'é👋\n'
  (tmp_path / 'a.txt').write_text(text)
  config = make_config(tmp_path, path=str(tmp_path / 'a.txt'), val_fraction=0.1,
                       test_fraction=0.05)
  n = len(text)
  assert list(sources.iter_texts(config, 'train')) == [text[:int(n * 0.85)]]
  assert list(sources.iter_texts(config, 'validation')) == [text[int(n * 0.85):int(n * 0.95)]]
  assert list(sources.iter_texts(config, 'test')) == [text[int(n * 0.95):]]
  with pytest.raises(ValueError, match="no split 'valid'.*eval_split"):
    list(sources.iter_texts(config, 'valid'))


def test_shakespeare_split_is_nanogpt(shakespeare_path, tmp_path):
  config = make_config(tmp_path, path=str(shakespeare_path), tokenizer='char')
  text = shakespeare_path.read_text()
  n = len(text)
  assert list(sources.iter_texts(config, 'train')) == [text[:int(n * 0.9)]]
  assert list(sources.iter_texts(config, 'validation')) == [text[int(n * 0.9):]]


def test_many_files_split_by_name_hash(tmp_path):
  for i in range(40):
    (tmp_path / 'docs' / f'{i // 10}').mkdir(parents=True, exist_ok=True)
    (tmp_path / 'docs' / f'{i // 10}' / f'doc{i}.txt').write_text(f'document {i}\n')
  config = make_config(tmp_path, path=str(tmp_path / 'docs'), val_fraction=0.2)
  splits = {s: sorted(sources.iter_texts(config, s)) for s in ('train', 'validation')}
  assert 0 < len(splits['validation']) < 20
  assert sorted(splits['train'] + splits['validation']) == sorted(
      f'document {i}\n' for i in range(40))
  # A new file lands in one split and never moves the others; a glob finds the same files.
  (tmp_path / 'docs' / '9').mkdir()
  (tmp_path / 'docs' / '9' / 'new.txt').write_text('new\n')
  config.data.path = str(tmp_path / 'docs' / '*' / '*.txt')
  after = {s: sorted(sources.iter_texts(config, s)) for s in ('train', 'validation')}
  assert {s: [t for t in after[s] if t != 'new\n'] for s in after} == splits


def test_jsonl_field_and_bad_lines(tmp_path, caplog):
  lines = [json.dumps({'body': f'record {i}', 'id': i}) for i in range(20)]
  lines[3] = json.dumps({'title': 'no body'})
  lines[5] = '{not json'
  (tmp_path / 'a.jsonl').write_text('\n'.join(lines) + '\n\n')
  config = make_config(tmp_path, path=str(tmp_path / 'a.jsonl'), json_field='body',
                       val_fraction=0.25)
  with caplog.at_level(logging.WARNING):
    train = list(sources.iter_texts(config, 'train'))
  assert len(train) == 13 and train[0] == 'record 0'  # 18 records: first 75% by position
  assert "skipped 1 of 20 JSON lines without a string field 'body'" in caplog.text
  assert 'skipped 1 lines that are not valid JSON' in caplog.text
  config = make_config(tmp_path, path=str(tmp_path / 'a.jsonl'), json_field='text')
  with pytest.raises(ValueError, match="has a string field 'text'.*'body'.*json_field"):
    sources.get_builder(config)


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path, caplog):
  (tmp_path / 'a.txt').write_bytes(b'caf\xe9 ok \xff\xfe end\n' * 10)
  config = make_config(tmp_path, path=str(tmp_path / 'a.txt'), tokenizer='bytes')
  with caplog.at_level(logging.WARNING):
    tok = tk.build_tokenizer(config)
    batch = next(pipeline.make_train_iter(config, tok, 0, 1))
  assert '30 bytes are not UTF-8; replaced by U+FFFD' in caplog.text
  assert '\ufffd' in next(sources.iter_texts(config, 'train'))
  assert batch['inputs'].shape == (4, 16)


def test_missing_and_empty_inputs(tmp_path, caplog):
  config = make_config(tmp_path, path=str(tmp_path / 'nope' / '*.txt'))
  with pytest.raises(FileNotFoundError, match='matches no file.*directory or a glob'):
    sources.get_builder(config)
  with pytest.raises(ValueError, match='needs --config.data.path'):
    sources.get_builder(make_config(tmp_path, path=''))
  (tmp_path / 'empty.txt').write_text('')
  with pytest.raises(ValueError, match='every file is empty.*empty.txt'):
    sources.get_builder(make_config(tmp_path, path=str(tmp_path / 'empty.txt')))
  (tmp_path / 'full.txt').write_text('some text\n')
  with caplog.at_level(logging.WARNING):
    sources.get_builder(make_config(tmp_path, path=f'{tmp_path}/*.txt', val_fraction=0))
  assert 'skipping 1 empty files of 2' in caplog.text
  with pytest.raises(ValueError, match='val_fraction=1.2'):
    sources.get_builder(make_config(tmp_path, path=f'{tmp_path}/full.txt', val_fraction=1.2))


def test_tiny_validation_split_is_a_clear_error(tmp_path):
  (tmp_path / 'a.txt').write_text('x' * 100)
  config = make_config(tmp_path, path=str(tmp_path / 'a.txt'), val_fraction=0.01,
                       tokenizer='char')  # 1 character, 1 token: no target
  tok = tk.build_tokenizer(config)
  with pytest.raises(ValueError, match="'validation' split has fewer than 2 tokens"):
    pipeline.make_eval_iter(config, tok, 0, 1)


def test_catalog_dataset_offline_error(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match='not default, text_files or a TFDS catalog name'):
    sources.get_builder(make_config(tmp_path, dataset='no_such_dataset_xyz'))
  import tensorflow_datasets as tfds

  def offline(*args, **kwargs):
    raise ConnectionError('network unreachable')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', offline)
  with pytest.raises(RuntimeError, match='tiny_shakespeare.*internet.*dataset=text_files'):
    sources.get_builder(make_config(tmp_path, dataset='tiny_shakespeare'))


def test_token_cache_is_reused(tmp_path, monkeypatch):
  (tmp_path / 'a.txt').write_text(random_text(500))
  config = make_config(tmp_path, path=str(tmp_path / 'a.txt'), tokenizer='char')
  tok = tk.build_tokenizer(config)
  tokens, offsets = sources.load_tokens(config, tok, 'train')
  assert tok.decode(tokens) == next(sources.iter_texts(config, 'train'))
  monkeypatch.setattr(tok, 'encode_batch_np', None)  # a second tokenization would fail
  tokens2, offsets2 = sources.load_tokens(config, tok, 'train')
  np.testing.assert_array_equal(tokens, tokens2)
  np.testing.assert_array_equal(offsets, offsets2)


# -- packing ---------------------------------------------------------------------------

def test_packing_keeps_every_token_and_masks_document_boundaries():
  rng = np.random.default_rng(0)
  lengths = rng.choice([1, 2, 5, 16, 17, 40], size=60)
  docs = [rng.integers(1, 100, size=n) for n in lengths]
  tokens = np.concatenate(docs)
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  doc_of = np.repeat(np.arange(len(docs)), lengths)
  pos_in_doc = np.concatenate([np.arange(n) for n in lengths])
  rows = pipeline.pack(tokens, offsets, seq_len=16)
  b = rows.batch(np.arange(len(rows) + 2))  # two extra rows past the end: padding
  T = 16
  assert b['inputs'].shape == (len(rows) + 2, T) and not b['weights'][-2:].any()
  # Inputs, row after row, are the stream; targets the stream shifted by one: nothing lost.
  valid = b['segment_ids'][:-2] > 0
  np.testing.assert_array_equal(b['inputs'][:-2][valid], tokens)
  np.testing.assert_array_equal(b['targets'][:-2][valid][:-1], tokens[1:])
  idx = np.arange(len(tokens))  # stream index of each valid input
  # Weights: exactly the targets inside the input's document (the last token has none).
  same_doc = np.append(doc_of[:-1] == doc_of[1:], False)
  np.testing.assert_array_equal(b['weights'][:-2][valid], same_doc)
  assert b['weights'].sum() == len(tokens) - len(docs)
  # Segment ids count documents within a row; positions restart with each segment.
  row_of = idx // T
  for r in range(len(rows)):
    sel = row_of == r
    first_doc = doc_of[idx[sel]][0]
    np.testing.assert_array_equal(b['segment_ids'][r][:sel.sum()], doc_of[idx[sel]] - first_doc + 1)
    pos = pos_in_doc[idx[sel]]
    pos = np.where(doc_of[idx[sel]] == first_doc, pos - pos[0], pos)
    np.testing.assert_array_equal(b['positions'][r][:sel.sum()], pos)
  assert b['weights'].dtype == np.float32 and b['inputs'].dtype == np.int32
  assert all(b[k].dtype == np.int32 for k in ('targets', 'segment_ids', 'positions'))
  stats = rows.stats()
  assert stats['kept'] == (len(tokens) - len(docs)) / len(tokens) and stats['fill'] > 0.95


def test_doc_transform_hook():
  tokens, offsets = np.arange(10), np.array([0, 4, 10])
  rows = pipeline.pack(tokens, offsets, 8, doc_transform=lambda d: np.append(d, 99))
  np.testing.assert_array_equal(rows.tokens, [0, 1, 2, 3, 99, 4, 5, 6, 7, 8, 9, 99])
  np.testing.assert_array_equal(rows.offsets, [0, 5, 12])


def _tokens_kept(config, tok):
  rows = pipeline.load_rows(config, tok, 'train')
  b = rows.batch(np.arange(len(rows)))
  return b['weights'].sum() / len(rows.tokens)


def test_tokens_kept_on_default_corpus(tmp_path):
  config = make_config(tmp_path, dataset='default', max_len=128)
  assert _tokens_kept(config, tk.build_tokenizer(config)) >= 0.95


def test_tokens_kept_on_shakespeare(shakespeare_path, tmp_path):
  config = make_config(tmp_path, path=str(shakespeare_path), tokenizer='char', max_len=64)
  assert _tokens_kept(config, tk.build_tokenizer(config)) >= 0.95


# -- the iterators ---------------------------------------------------------------------

@pytest.fixture
def small(tmp_path):
  """One document of 641 bytes tokens (640 + eos): exactly 40 rows of 16 targets."""
  (tmp_path / 'a.txt').write_text(random_text(640))
  config = make_config(tmp_path, path=str(tmp_path / 'a.txt'), val_fraction=0.0)
  return config, tk.build_tokenizer(config)


def _rows_of(batches):
  return [tuple(row) for b in batches for row in b['inputs']]


def test_train_iter_batches(small):
  config, tok = small
  b = next(pipeline.make_train_iter(config, tok, 0, 1))
  assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
      'inputs': ((4, 16), 'int32'), 'targets': ((4, 16), 'int32'),
      'segment_ids': ((4, 16), 'int32'), 'positions': ((4, 16), 'int32'),
      'weights': ((4, 16), 'float32')}
  np.testing.assert_array_equal(b['inputs'][:, 1:], b['targets'][:, :-1])


def test_epochs_cover_every_row_once_and_reshuffle(small):
  config, tok = small
  all_rows = _rows_of([pipeline.load_rows(config, tok, 'train').batch(np.arange(40))])
  it = pipeline.make_train_iter(config, tok, 0, 1)
  epochs = [_rows_of(take(it, 10)) for _ in range(3)]  # 10 batches of 4 = 40 rows
  for epoch in epochs:
    assert sorted(epoch) == sorted(all_rows)
  assert epochs[0] != epochs[1] != epochs[2]


def test_same_seed_same_batches(small):
  config, tok = small
  a = take(pipeline.make_train_iter(config, tok, 0, 1), 15)
  assert_batches_equal(a, take(pipeline.make_train_iter(config, tok, 0, 1), 15))
  config.train.seed = 1
  assert _rows_of(a) != _rows_of(take(pipeline.make_train_iter(config, tok, 0, 1), 15))
  config.data.shuffle = False
  ordered = _rows_of(take(pipeline.make_train_iter(config, tok, 0, 1), 10))
  assert ordered == _rows_of([pipeline.load_rows(config, tok, 'train').batch(np.arange(40))])


def test_resume_yields_exactly_the_next_batches(small):
  config, tok = small
  reference = take(pipeline.make_train_iter(config, tok, 0, 1), 25)
  it = pipeline.make_train_iter(config, tok, 0, 1)
  take(it, 13)
  state = json.loads(json.dumps(it.get_state()))  # it must survive a JSON round trip
  restored = pipeline.make_train_iter(config, tok, 0, 1)
  restored.set_state(state)
  assert_batches_equal(take(restored, 12), reference[13:])


def test_batch_transform_hook_is_seeded_and_resumable(small):
  config, tok = small

  def mask(batch, rng):  # an MLM-like transform on packed rows
    batch = dict(batch)
    batch['inputs'] = np.where(rng.random(batch['inputs'].shape) < 0.15, 0, batch['inputs'])
    return batch

  reference = take(pipeline.make_train_iter(config, tok, 0, 1, transform=mask), 6)
  assert any((b['inputs'] == 0).any() for b in reference)
  it = pipeline.make_train_iter(config, tok, 0, 1, transform=mask)
  take(it, 3)
  restored = pipeline.make_train_iter(config, tok, 0, 1, transform=mask)
  restored.set_state(it.get_state())
  assert_batches_equal(take(restored, 3), reference[3:])


def test_two_processes_cover_each_global_batch_once(small):
  config, tok = small
  single = take(pipeline.make_train_iter(config, tok, 0, 1), 20)  # two epochs
  parts = [take(pipeline.make_train_iter(config, tok, p, 2), 20) for p in (0, 1)]
  for k in range(20):
    assert parts[0][k]['inputs'].shape == (2, 16)
    assert sorted(_rows_of([parts[0][k], parts[1][k]])) == sorted(_rows_of([single[k]]))
  for epoch in (slice(0, 10), slice(10, 20)):
    together = _rows_of(parts[0][epoch]) + _rows_of(parts[1][epoch])
    assert len(set(together)) == len(together) == 40
  with pytest.raises(ValueError, match='multiple of the number of processes'):
    pipeline.make_train_iter(config, tok, 0, 3)


def test_eval_iter_is_ordered_finite_and_padded(tmp_path):
  (tmp_path / 'a.txt').write_text(random_text(2000))
  config = make_config(tmp_path, path=str(tmp_path / 'a.txt'), val_fraction=0.5)
  tok = tk.build_tokenizer(config)
  rows = pipeline.load_rows(config, tok, 'validation')
  assert len(rows) == 63  # 1000 chars + eos: 16 batches of 4, the last one row short
  ds = pipeline.make_eval_iter(config, tok, 0, 1)
  first, second = list(ds), list(ds)  # each pass starts afresh
  assert len(first) == 16
  assert_batches_equal(first, second)
  assert _rows_of(first)[:63] == _rows_of([rows.batch(np.arange(63))])
  assert not first[-1]['weights'][-1].any() and not first[-1]['segment_ids'][-1].any()
  assert sum(b['weights'].sum() for b in first) == len(rows.tokens) - 1
  capped = list(pipeline.make_eval_iter(config, tok, 0, 1, num_batches=5))
  assert len(capped) == 5  # a capped pass: 20 rows spread evenly over the split, in order
  assert _rows_of(capped) == _rows_of([rows.batch(np.arange(20) * 63 // 20)])
  parts = [list(pipeline.make_eval_iter(config, tok, p, 2)) for p in (0, 1)]
  assert len(parts[0]) == len(parts[1]) == 16
  together = _rows_of(parts[0]) + _rows_of(parts[1])
  assert sorted(together) == sorted(_rows_of(first))


def test_sentencepiece_through_the_pipeline(tmp_path):
  (tmp_path / 'a.txt').write_text(random_text(20000))
  config = make_config(tmp_path, path=str(tmp_path / 'a.txt'), tokenizer='sentencepiece',
                       vocab_size=300, add_bos=True)
  tok = tk.build_tokenizer(config)
  rows = pipeline.load_rows(config, tok, 'train')
  assert rows.tokens[0] == tok.bos_id and rows.tokens[-1] == tok.eos_id
  assert tok.decode(rows.tokens) == next(sources.iter_texts(config, 'train'))
  b = next(pipeline.make_train_iter(config, tok, 0, 1))
  assert b['inputs'].max() < tok.vocab_size


def test_measure_throughput(shakespeare_path, tmp_path):
  # The shakespeare_char setting: training consumes ~20k tokens/s here; ask for 20x.
  config = make_config(tmp_path, path=str(shakespeare_path), tokenizer='char', max_len=64,
                       batch_size=12)
  assert pipeline.measure_throughput(config, num_batches=300) >= 400_000
