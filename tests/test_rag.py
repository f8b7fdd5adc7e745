"""Retrieval-augmented generation (lm/rag): chunk windows, the embedded set, the InfoNCE loss
by hand, exact and HNSW search, then tiny runs through scripts/rag.py and the server."""
import json
import pathlib
import subprocess
import sys

import fastapi.testclient
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.config import base_config
from lm.data import tokenizers
from lm.infer.load import build_model
from lm.rag import corpus, embed, index, pipeline
from lm.serve import api, engine
from lm.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
ONE = jax.devices()[:1]


def test_windows_cover_every_short_run_and_chunks_round_trip():
  for n, size, overlap in ((1, 4, 0), (10, 4, 1), (97, 16, 8), (200, 96, 48)):
    w = index.windows(n, size, overlap)
    assert w[0][0] == 0 and w[-1][1] == n and all(b - a <= size for a, b in w)
    for start in range(n - overlap):  # every run of overlap + 1 items lies in one window
      assert any(a <= start and start + overlap + 1 <= b for a, b in w), (n, start)
  with pytest.raises(ValueError, match='overlap < size'):
    index.windows(10, 4, 4)
  text = corpus.towns(1, 'eval')[0].document()
  tok = tokenizers.ByteTokenizer()
  assert index.chunk(text, tok, 96, 48) == corpus.byte_chunks(text, 96, 48)


def test_the_embedded_facts_live_only_in_their_documents():
  train, evals = corpus.towns(400, 'train'), corpus.towns(200, 'eval')
  assert not {t.town for t in train} & {t.town for t in evals}
  assert len({t.town for t in evals}) == 200
  docs = {d['source']: d['text'] for d in corpus.documents(evals)}
  qs = corpus.questions(evals)
  assert len(qs) == 800
  for q in qs:  # the evidence is in its own document only; the town is named once per town
    assert q['answer'] in q['evidence'] and q['evidence'] in docs[q['source']]
    assert sum(q['evidence'] in text for text in docs.values()) == 1
  records, _ = corpus.reader_sets(40, 8)
  for r in records:  # the answer is in the reader's passage, which fits its 192 bytes
    user, answer = r['messages'][0]['content'], r['messages'][1]['content']
    assert answer in user.split('Question:')[0] and len(user) < 160
  two, _ = corpus.reader_sets(40, 8, k=2)
  assert all(r['messages'][0]['content'].count('\n[') == 2 for r in two)


def encoder_config(**model):
  c = base_config('encoder')
  c.model.update(dict(dict(vocab_size=0, max_len=112, max_positions=112, d_model=32,
                           n_layers=1, n_heads=2, pooler=False, mlm_head=False), **model))
  c.task.update(name='embedding', finetune_examples=256, finetune_eval=64, query_len=40)
  c.data.tokenizer = 'bytes'
  c.mesh.update(data=1, fsdp=1, tensor=1)
  c.train.update(batch_size=16, steps=20, log_every=10, eval_every=20, eval_steps=2, seed=1)
  c.optimizer.update(lr=3e-3, warmup_steps=2)
  c.checkpoint.update(every_steps=20, keep=1, async_save=False)
  return c


def test_infonce_loss_by_hand():
  """mean and CLS pooling of an encoder, last-token pooling of a decoder; a padding row and
  a copy of a passage (no negative for its twin)."""
  dec = base_config()
  dec.model.update(vocab_size=259, max_len=112, d_model=32, n_layers=1, n_heads=2)
  dec.task.update(name='embedding', query_len=40)
  tok = tokenizers.ByteTokenizer()
  pairs = [('Who is it?', 'It is Bob.'), ('Where?', 'In Rome, by the sea.'),
           ('When was it?', 'In 1742.'), ('Who?', 'It is Bob.')]  # a copy: no negative
  q, ql = embed.encode_texts([p[0] for p in pairs], tok, 40)
  p, pl = embed.encode_texts([p[1] for p in pairs], tok, 112)
  batch = embed.PairTexts(q, ql, p, pl, tok.pad_id).batch([0, 1, 2, 3, 4])  # row 4: padding
  for c, poolings in ((encoder_config(vocab_size=259), ('mean', 'cls')), (dec, ('last',))):
    model = build_model(c)
    # Any weights do: random ones of the model's shapes (compiling model.init takes ~8 s).
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s, r=rng: r.normal(0, 0.2, s.shape).astype(s.dtype),
                          jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                         jnp.zeros((1, 8), jnp.int32))['params'])
    hidden = jax.jit(lambda x, m=model, v=params: m.apply({'params': v}, x, head='hidden'))
    for pooling in poolings:
      c.task.pooling, c.task.embed_temperature = pooling, 0.1
      task = embed.Embedding(c)
      s, w, aux = jax.jit(lambda v, b, t=task, m=model: t.loss(m, v, {}, b, None, True))(
          params, batch)

      def pooled(tokens, lengths, pooling=pooling):  # each text alone, unpadded, by hand
        out = []
        for row, n in zip(tokens, lengths):
          h = np.asarray(hidden(jnp.asarray(row[None, :n])))[0]
          v = dict(mean=h.mean(0), cls=h[0], last=h[-1])[pooling]
          out.append(v / np.linalg.norm(v))
        return np.stack(out)
      logits = pooled(q, ql) @ pooled(p, pl).T / 0.1
      logits[0, 3] = logits[3, 0] = -np.inf  # rows 0 and 3 share their passage
      nll = -np.diag(logits - np.log(np.exp(logits).sum(1, keepdims=True)))
      assert float(w) == 4
      np.testing.assert_allclose(float(s), nll.sum(), rtol=2e-4, err_msg=pooling)
      assert float(aux['accuracy']) == (logits.argmax(1) == np.arange(4)).sum()


def test_exact_search_equals_brute_force_and_hnsw_recall(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3000, 32)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  chunks = [dict(text=f't{i}', source=f's{i}', chunk=0) for i in range(len(x))]
  idx = index.Index(x, chunks, dict(encoder='', pooling='mean'))
  queries = x[:50] + 0.3 * rng.normal(size=(50, 32)).astype(np.float32)
  scores, ids = idx.search(queries, 10)
  want = np.argsort(-(queries @ x.T), axis=1, kind='stable')[:, :10]
  np.testing.assert_array_equal(ids, want)
  assert np.all(np.diff(scores, axis=1) <= 0)
  idx.build_hnsw()
  idx.save(tmp_path / 'idx')
  back = index.load(tmp_path / 'idx')
  assert back.hnsw is not None and back.chunks == chunks
  _, approx = back.search(queries, 10)  # the HNSW graph, searched by default
  recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, want)])
  assert recall >= 0.95, recall
  np.testing.assert_array_equal(back.search(queries, 10, approximate=False)[1], want)
  with pytest.raises(FileNotFoundError, match='not an index'):
    index.load(tmp_path)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(retriever run, reader run, index dir): tiny runs, and the embedded store indexed."""
  base = tmp_path_factory.mktemp('rag')
  trainer.train(encoder_config(), base / 'retriever', log=lambda s: None, devices=ONE)
  c = base_config()
  c.model.update(vocab_size=0, max_len=192, d_model=32, n_layers=1, n_heads=2)
  c.task.update(name='sft', finetune_set='rag', finetune_examples=64, finetune_eval=16)
  c.data.tokenizer = 'bytes'
  c.mesh.update(data=1, fsdp=1, tensor=1)
  c.train.update(batch_size=4, steps=2, log_every=1, eval_every=0, seed=1)
  c.checkpoint.update(every_steps=2, keep=1, async_save=False)
  trainer.train(c, base / 'reader', log=lambda s: None, devices=ONE)
  docs = corpus.documents(corpus.towns(200, 'eval'))  # what `rag.py index --docs=embedded` does
  idx = index.build(embed.Embedder.from_run(base / 'retriever'), docs, 96, 48, approximate=True,
                    log=lambda s: None)
  idx.save(base / 'index')
  return base / 'retriever', base / 'reader', base / 'index'


def test_the_embedding_run_learns_and_the_index_holds_the_store(runs):
  retriever, _, index_dir = runs
  lines = [json.loads(x) for x in (retriever / 'metrics.jsonl').read_text().splitlines()]
  losses = [x['train/loss'] for x in lines if 'train/loss' in x]
  assert losses[-1] < losses[0] - 0.3, losses  # log(16) = 2.77 at chance
  idx = index.load(index_dir)
  assert idx.meta['encoder'] == str(retriever) and idx.meta['pooling'] == 'mean'
  assert {c['source'] for c in idx.chunks} == {f'town/{t.town}' for t in corpus.towns(200, 'eval')}
  np.testing.assert_allclose(np.linalg.norm(idx.embeddings, axis=1), 1, atol=1e-5)
  r = pipeline.Retriever.load(index_dir)  # a chunk's own text retrieves itself first
  got = r.retrieve([idx.chunks[5]['text'], idx.chunks[77]['text']], 3, approximate=False)
  assert [g[0]['chunk'] == idx.chunks[i]['chunk'] and g[0]['source'] == idx.chunks[i]['source']
          for g, i in ((got[0], 5), (got[1], 77))] == [True, True]


def test_answers_and_the_eval_script(runs, tmp_path):
  _, reader_dir, index_dir = runs
  q = 'Who is the mayor of ' + corpus.towns(1, 'eval')[0].town + '?'
  sources = pipeline.Retriever.load(index_dir).retrieve([q], 2)[0]  # what `rag.py ask` does
  assert all({'text', 'source', 'chunk', 'score'} <= set(s) for s in sources)
  assert sources[0]['score'] >= sources[1]['score']
  reader = pipeline.Reader.from_run(reader_dir)
  long = ['x' * 150] * 3  # too long for the context: dropped, the last first
  rec = reader.record(q, [sources[0]['text']] + long, room=8)
  assert rec['messages'][0]['content'] == pipeline.prompt(q, [sources[0]['text']])
  answers = reader.answer([q, q], [[sources[0]['text']], []], max_new_tokens=6)
  assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
  out = subprocess.run([sys.executable, str(ROOT / 'scripts/rag.py'), 'eval',
                        f'--index={index_dir}', f'--generator={reader_dir}', '--limit=12', '--k=2',
                        f'--out={tmp_path / "rag"}'], capture_output=True, text=True, check=True)
  res = json.loads(out.stdout.splitlines()[-1])['results']
  assert res['questions'] == 12 and res['recall@1'] <= res['recall@2'] <= res['recall@10']
  rows = [json.loads(x) for x in (tmp_path / 'rag.samples.jsonl').read_text().splitlines()]
  assert np.mean([r['hit'] for r in rows]) == res['recall@2']
  assert {'closed_book', 'rag'} <= set(rows[0])


def test_server_with_an_index_grounds_chat_and_returns_sources(runs):
  _, reader_dir, index_dir = runs
  retriever = pipeline.Retriever.load(index_dir)
  reader = pipeline.Reader.from_run(reader_dir)
  eng = engine.Engine(reader.model, reader.params, reader.tokenizer, max_batch=2)
  from lm.train import checkpoint
  server = api.Server(eng, checkpoint.read_config(reader_dir), model_id='rag',
                      retriever=retriever, rag_k=2)
  eng.start()
  try:
    with fastapi.testclient.TestClient(api.create_app(server)) as client:
      q = 'When was ' + corpus.towns(3, 'eval')[2].town + ' founded?'
      r = client.post('/v1/chat/completions', json=dict(
          model='rag', max_tokens=4, temperature=0,
          messages=[dict(role='user', content=q)])).json()
  finally:
    eng.stop(10)
  want = retriever.retrieve([q], 2)[0]  # two do not fit the 192-token reader: the second goes
  assert [(s['source'], s['chunk']) for s in r['sources']] == [(want[0]['source'],
                                                                want[0]['chunk'])]
  prompt = reader.template.render([dict(role='user', content=pipeline.prompt(
      q, [want[0]['text']]))], add_generation_prompt=True)
  assert r['usage']['prompt_tokens'] == len(reader.tokenizer.encode(prompt))
