"""The evaluation harness (lm/eval/harness.py, tasks.py, scripts/evaluate.py): each kind's
numbers against an independent computation, batching, task files and their errors.

Decoders are the random tiny Hugging Face models of test_convert_hf, imported; references
are computed with transformers/torch on the same token ids.
"""
import json
import math
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip('transformers')
torch = pytest.importorskip('torch')

from test_convert_hf import hf_dir, hf_model, imported  # noqa: E402

from lm import models  # noqa: E402
from lm.config import base_config  # noqa: E402
from lm.data.tokenizers import ByteTokenizer  # noqa: E402
from lm.eval import harness, metrics, tasks  # noqa: E402
from lm.infer import sampling  # noqa: E402
from lm.infer.load import build_model  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT = ('The quick brown fox jumps over the lazy dog. Hello world! How are you today? '
        'Tokenizers are fun, 123 456. Sphinx of black quartz, judge my vow. ') * 3


def evaluator(name='gpt2', **kwargs):
  _, config, params, tokenizer = imported(name)
  return harness.Evaluator(build_model(config), params, tokenizer, config,
                           **dict(dict(batch_size=4), **kwargs))


def hf_logprobs(name, ids) -> np.ndarray:
  """log p(ids[t] | ids[:t]) for t >= 1 under the transformers model, float64."""
  with torch.no_grad():
    logits = hf_model(hf_dir(name))(torch.tensor([ids])).logits[0, :-1].double()
  return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


@pytest.mark.parametrize('name', ['gpt2', 'llama3_gqa'])  # no BOS / BOS from the tokenizer
def test_perplexity_equals_transformers_sliding_window(name):
  max_len, stride = 32, 12
  ids = transformers.AutoTokenizer.from_pretrained(hf_dir(name))(TEXT).input_ids
  assert len(ids) > 2 * max_len
  total, count, prev_end = 0.0, 0, 0
  for begin in range(0, len(ids), stride):  # transformers' perplexity guide, summed exactly
    end = min(begin + max_len, len(ids))
    trg = end - prev_end
    lp = hf_logprobs(name, ids[begin:end])
    lp = lp[-trg:] if trg < end - begin else lp  # labels[:-trg] = -100, then the shift
    total, count, prev_end = total + lp.sum(), count + len(lp), end
    if end == len(ids):
      break
  assert count == len(ids) - 1  # every token after the first, once
  result = evaluator(name).run(tasks.Task('t', 'perplexity', records=[dict(text=TEXT)],
                                          max_len=max_len, stride=stride))
  assert result.metrics['perplexity'] == pytest.approx(math.exp(-total / count), rel=1e-4)
  assert result.metrics['bits_per_byte'] == pytest.approx(
      -total / len(TEXT.encode()) / math.log(2), rel=1e-4)
  assert result.metrics['word_perplexity'] == pytest.approx(
      math.exp(-total / len(TEXT.split())), rel=1e-4)
  assert result.samples[0]['tokens'] == count


def test_bad_windows_are_refused():
  ev = evaluator()
  for max_len, stride in ((32, 32), (32, 0), (1000, 8)):
    with pytest.raises(ValueError, match='stride'):
      ev.run(tasks.Task('t', 'perplexity', records=[dict(text=TEXT)], max_len=max_len,
                        stride=stride or -1))


def test_multiple_choice_acc_and_acc_norm_hand_worked(monkeypatch):
  ev = evaluator()
  table = {' a': -2.0, ' bbbb': -4.0, ' cc': -3.0}
  seen = []

  def fake(requests):
    seen.extend(requests)
    return [(table[c], False) for _, c in requests]
  monkeypatch.setattr(ev, 'loglikelihood', fake)
  records = [dict(context='Q1', choices=['a', 'bbbb'], label=1),  # ll argmax 0; /bytes: 1
             dict(context='Q2', choices=['cc', 'a'], label=1),  # ll 1; /bytes -1.5 vs -2: 0
             dict(context='Q3', choices=['a', 'cc'], label=0)]  # ll 0; /bytes -2 vs -1.5: 1
  r = ev.run(tasks.Task('mc', 'multiple_choice', records=records))
  assert r.metrics == dict(acc=pytest.approx(2 / 3), acc_norm=pytest.approx(1 / 3))
  # stderr: sample std (ddof 1) of [0, 1, 1] over sqrt(3) = sqrt(1/3) / sqrt(3) = 1/3
  assert r.stderr['acc'] == pytest.approx(1 / 3)
  assert [s['prediction'] for s in r.samples] == [0, 1, 0]
  assert seen[:2] == [('Q1', ' a'), ('Q1', ' bbbb')]
  # One shot: another record's context, the delimiter and its right answer, then "\n\n".
  seen.clear()
  ev.run(tasks.Task('mc', 'multiple_choice', records=records, num_fewshot=1))
  shots = {'Q1 bbbb\n\n', 'Q2 a\n\n', 'Q3 a\n\n'}
  contexts = [seen[0][0], seen[2][0], seen[4][0]]
  for context, own in zip(contexts, ['Q1', 'Q2', 'Q3']):
    shot = context[:-len(own)]
    assert context.endswith(own) and shot in shots and not shot.startswith(own)


def test_loglikelihoods_equal_transformers_and_follow_lm_eval_split():
  ev = evaluator('gpt2')
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir('gpt2'))
  requests = [('The quick brown', ' fox jumps'), ('Hello world! How are ', 'you today?'),
              ('', 'Sphinx of black quartz')]
  got = ev.loglikelihood(requests)
  for (context, continuation), (ll, _) in zip(requests, got):
    spaces = len(context) - len(context.rstrip())  # lm-eval: trailing spaces go right
    cut = len(context) - spaces
    context, continuation = context[:cut], context[cut:] + continuation
    ctx = tok(context).input_ids or [0]  # empty context: the EOS/BOS token (id 0)
    whole = (tok(context).input_ids + tok(context + continuation).input_ids[
        len(tok(context).input_ids):])
    n = len(whole) - len(tok(context).input_ids)
    ids = ctx + whole[len(whole) - n:]
    assert ll == pytest.approx(hf_logprobs('gpt2', ids)[-n:].sum(), rel=1e-4, abs=1e-4)
  # A greedy continuation is flagged: take the model's own argmax tokens.
  ids = tok('The quick').input_ids
  with torch.no_grad():
    nxt = int(hf_model(hf_dir('gpt2'))(torch.tensor([ids])).logits[0, -1].argmax())
  cont = tok.decode([nxt])
  if tok(tok.decode(ids) + cont).input_ids == ids + [nxt]:  # the text round-trips
    assert ev.loglikelihood([('The quick', cont)])[0][1]


def test_generation_is_batch_invariant_and_scored_by_the_libraries():
  ev = evaluator('gpt2', batch_size=4)
  tok = ev.tokenizer
  inputs = ['The quick brown', 'Hello', 'Tokenizers are fun, 123', 'Sphinx of black quartz,',
            'How are you', 'A']
  alone = []
  for text in inputs:
    ids = sampling.encode_prompt(tok, text)
    out = sampling.generate(ev.model, ev.params, [ids], max_new_tokens=6, temperature=0.0,
                            eos_id=tok.eos_id, pad_to=16)[0]  # one compile for all six
    alone.append(tok.decode(out[:-1] if out and out[-1] == tok.eos_id else out))
  # Even examples: the output is the reference (right unless the output is empty).
  records = [dict(input=t, references=[o if i % 2 == 0 and o else 'zzz qqq'])
             for i, (t, o) in enumerate(zip(inputs, alone))]
  right = sum(1 for i, o in enumerate(alone) if i % 2 == 0 and o)
  assert right >= 2
  r = ev.run(tasks.Task('g', 'generation', records=records, max_new_tokens=6))
  assert [s['output'] for s in r.samples] == alone  # 6 prompts in 2 padded batches of 4
  assert r.metrics['exact_match'] == pytest.approx(right / 6)
  refs = [x['references'] for x in records]
  assert r.metrics['bleu'] == pytest.approx(metrics.bleu(alone, refs))
  assert r.metrics['rougeL'] == pytest.approx(metrics.rouge(alone, refs)['rougeL'])
  # Stop strings cut the output.
  k = max(range(6), key=lambda i: len(alone[i]))
  stop = alone[k][len(alone[k]) // 2:][:2]
  r = ev.run(tasks.Task('g', 'generation', records=records[k:k + 1], max_new_tokens=6,
                        stop=(stop,)))
  assert r.samples[0]['output'] == alone[k].split(stop, 1)[0] != alone[k]


def tiny_encoder():
  tok = ByteTokenizer(user_symbols=('[MASK]',))
  c = base_config('encoder')
  c.model.update(vocab_size=tok.vocab_size, max_len=24, max_positions=24, d_model=32,
                 n_layers=1, n_heads=4, num_labels=3)
  c.task.labels = ('neg', 'neu', 'pos')
  model = models.get_model(c.model, c.runtime)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype),
                        nn.unbox(models.param_shapes(model)))
  return model, params, tok, c


def test_encoder_pseudo_loglikelihood_and_classifier_head():
  model, params, tok, c = tiny_encoder()
  ev = harness.Evaluator(model, params, tok, c, batch_size=8)
  texts = ['a cat', 'dogs ran']
  got = ev.pseudo_loglikelihood(texts)
  mask = tok.symbol_id('[MASK]')
  apply = jax.jit(model.apply, static_argnames='head')
  for text, value in zip(texts, got):  # one masked copy per token, one at a time
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text) + [tok.eos_id]
    want = 0.0
    for p, t in enumerate(ids):
      if t in tok.special_ids:
        continue
      masked = list(ids)
      masked[p] = mask
      logits = apply({'params': params}, jnp.asarray([masked]), head='mlm')[0, p]
      want += float(jax.nn.log_softmax(logits)[t])
    assert value == pytest.approx(want, rel=1e-4)
  records = [dict(text=t, label=lab) for t, lab in
             [('good', 'pos'), ('bad', 'neg'), ('fine', 'neu'), ('great', 2), ('awful', 0)]]
  r = ev.run(tasks.Task('c', 'classification', records=records))
  want = []
  for rec in records:
    ids = [tok.bos_id] + tok.encode(rec['text']) + [tok.eos_id]
    logits = apply({'params': params}, jnp.asarray([ids]), head='classify')
    want.append(c.task.labels[int(jnp.argmax(logits[0]))])
  assert [s['prediction'] for s in r.samples] == want
  labels = [0 if s['label'] == 'neg' else 1 if s['label'] == 'neu' else 2 for s in r.samples]
  report = metrics.classification_report(labels, [c.task.labels.index(w) for w in want],
                                         list(c.task.labels))
  assert r.metrics['f1_macro'] == pytest.approx(report['f1_macro'])
  assert r.confusion[0] == report['confusion']
  # bias pairs on an encoder: the pseudo-log-likelihoods decide
  r = ev.run(tasks.Task('b', 'bias_pairs', records=[
      dict(sent_more=texts[0], sent_less=texts[1], bias_type='x')]))
  assert r.metrics['pct_stereotype'] == float(got[0] > got[1])


def test_bias_pairs_and_label_words_on_a_decoder():
  ev = evaluator('gpt2')
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir('gpt2'))
  pairs = [dict(sent_more='The nurse said she was late.', sent_less='The nurse said he was late.',
                bias_type='gender'),
           dict(sent_more='Old people are slow.', sent_less='Young people are slow.',
                bias_type='age')]
  r = ev.run(tasks.Task('b', 'bias_pairs', records=pairs))
  for s in r.samples:  # the whole sentence after the start token (id 0 here)
    for key in ('more', 'less'):
      ids = [0] + tok(s[f'sent_{key}']).input_ids
      assert s[f'score_{key}'] == pytest.approx(hf_logprobs('gpt2', ids).sum(), rel=1e-4)
  prefers = [float(s['score_more'] > s['score_less']) for s in r.samples]
  assert r.metrics['pct_stereotype'] == pytest.approx(np.mean(prefers))
  assert r.metrics['pct_stereotype/age'] == prefers[1]
  # classification by label words: the likeliest word after the prompt
  records = [dict(text='Hello world', label='yes'), dict(text='How are you', label='no')]
  r = ev.run(tasks.Task('c', 'classification', records=records, prompt='{text}?',
                        label_words=dict(yes='fox', no='dog')))
  ll = np.array([s for s, _ in ev.loglikelihood(
      [(f'{x["text"]}?', f' {w}') for x in records for w in ('fox', 'dog')])]).reshape(2, 2)
  assert [s['prediction'] for s in r.samples] == [['yes', 'no'][i] for i in ll.argmax(1)]


def test_robustness_reports_each_perturbation_and_its_drop(monkeypatch):
  ev = evaluator()
  records = [dict(context='Q1 text', choices=['a', 'bb'], label=0),
             dict(context='Q2 text', choices=['a', 'bb'], label=1)]

  def fake(requests):  # right only when the context is unperturbed
    return [((-1.0 if (c == ' a') == ('Q1' in ctx) else -5.0) if ctx.endswith('text') else
             (-1.0 if c == ' bb' else -5.0), False) for ctx, c in requests]
  monkeypatch.setattr(ev, 'loglikelihood', fake)
  r = ev.run(tasks.Task('mc', 'multiple_choice', records=records, perturb=('upper',)))
  assert r.metrics['acc'] == 1.0 and r.metrics['acc@upper'] == 0.5
  assert r.metrics['acc_drop@upper'] == 0.5
  assert r.samples[0]['perturbed@upper']['context'] == 'Q1 TEXT'
  with pytest.raises(ValueError, match='typos'):
    ev.run(tasks.Task('mc', 'multiple_choice', records=records, perturb=('typo:x',)))


BAD = [('multiple_choice', {'context': 'q', 'choices': ['a', 'b']}, 'missing field "label"'),
       ('multiple_choice', {'context': 'q', 'choices': ['a', 'b'], 'label': 2}, 'out of range'),
       ('multiple_choice', {'context': 'q', 'choices': ['a'], 'label': 0}, 'at least 2'),
       ('generation', {'input': 'q', 'references': []}, 'non-empty list'),
       ('generation', {'input': 'q', 'references': ['']}, 'non-empty list'),
       ('classification', {'text': 'q'}, 'missing field "label"'),
       ('bias_pairs', {'sent_more': 'a b', 'sent_less': 'a b'}, 'two different'),
       ('perplexity', {'text': 3}, 'must be str')]


@pytest.mark.parametrize('kind,record,message', BAD)
def test_bad_records_name_file_and_line(kind, record, message, tmp_path):
  path = tmp_path / 'data.jsonl'
  good = dict(multiple_choice={'context': 'q', 'choices': ['a', 'b'], 'label': 0},
              generation={'input': 'q', 'references': ['r']},
              classification={'text': 'q', 'label': 'x'},
              bias_pairs={'sent_more': 'a b', 'sent_less': 'a c'},
              perplexity={'text': 'q'})[kind]
  path.write_text(json.dumps(good) + '\n\n' + json.dumps(record) + '\n')
  with pytest.raises(ValueError, match=f'{path}:3: .*{message}'):
    tasks.read_records(kind, str(path))
  path.write_text('{"context": \n')
  with pytest.raises(ValueError, match=f'{path}:1: not valid JSON'):
    tasks.read_records(kind, str(path))


def test_task_specs_yaml_and_errors(tmp_path):
  (tmp_path / 'd.jsonl').write_text('{"input": "q", "references": ["r"]}\n')
  (tmp_path / 't.yaml').write_text('kind: generation\npath: d.jsonl\nnum_fewshot: 2\n'
                                   'stop: "\\n"\n')
  task = tasks.resolve(str(tmp_path / 't.yaml'))
  assert (task.kind, task.path, task.num_fewshot, task.stop) == (
      'generation', str(tmp_path / 'd.jsonl'), 2, ('\n',))
  assert tasks.resolve(str(tmp_path / 't.yaml'), num_fewshot=0).num_fewshot == 0
  (tmp_path / 'bad.yaml').write_text('kind: generation\npath: d.jsonl\nshots: 2\n')
  with pytest.raises(ValueError, match="unknown setting.*shots"):
    tasks.resolve(str(tmp_path / 'bad.yaml'))
  with pytest.raises(ValueError, match='Unknown task'):
    tasks.resolve('no_such_task')
  with pytest.raises(ValueError, match='unknown kind'):
    tasks.Task('x', 'ranking')
  crows = tmp_path / 'crows.csv'  # the CrowS-Pairs CSV's columns
  crows.write_text(',sent_more,sent_less,stereo_antistereo,bias_type\n'
                   '0,He is bad at math.,She is bad at math.,antistereo,gender\n')
  assert tasks.read_records('bias_pairs', str(crows))[0]['bias_type'] == 'gender'
  choice = tasks.resolve('finetune_choice').records
  assert len(choice) == 200  # three wrong answers (two for a record's other field values)
  assert all(len(set(r['choices'])) == len(r['choices']) >= 3 for r in choice)
  assert len({r['label'] for r in choice}) == 4


def test_evaluate_script_writes_table_json_samples_and_confusion(tmp_path):
  workdir = imported('gpt2')[0]
  (tmp_path / 'cls.jsonl').write_text(''.join(
      json.dumps(dict(text=t, label=l)) + '\n' for t, l in
      [('good', 'fox'), ('bad', 'dog'), ('fine', 'fox')]))
  (tmp_path / 'mc.jsonl').write_text(json.dumps(dict(context='The quick', choices=[
      ' brown', ' lazy'], label=0)) + '\n')
  out = tmp_path / 'res.json'
  proc = subprocess.run(
      [sys.executable, str(ROOT / 'scripts' / 'evaluate.py'), f'--workdir={workdir}',
       f'--tasks=classification:{tmp_path / "cls.jsonl"},multiple_choice:{tmp_path / "mc.jsonl"},'
       f'perplexity:{ROOT / "README.md"}', '--limit=2', f'--out={out}'],
      capture_output=True, text=True, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '| task | metric | value | stderr | n |' in proc.stdout
  data = json.loads(out.read_text())
  cls = f'classification:{tmp_path / "cls.jsonl"}'
  assert set(data['results']) == {cls, f'multiple_choice:{tmp_path / "mc.jsonl"}',
                                  f'perplexity:{ROOT / "README.md"}'}
  assert data['results'][cls]['n'] == 2 and 'accuracy' in data['results'][cls]
  assert 'acc_stderr' in data['results'][f'multiple_choice:{tmp_path / "mc.jsonl"}']
  samples = [json.loads(x) for x in (tmp_path / 'res.samples.jsonl').read_text().splitlines()]
  assert len(samples) == 2 + 1 + 1
  png = next(tmp_path.glob('res.*.confusion.png'))
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  bad = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'evaluate.py'),
                        f'--workdir={workdir}', '--tasks=multiple_choice:missing.jsonl'],
                       capture_output=True, text=True, cwd=tmp_path)
  assert bad.returncode != 0 and 'missing.jsonl does not exist' in bad.stderr


def test_encoder_decoder_scores_equal_transformers(tmp_path):
  from test_convert_t5 import make_t5_checkpoint
  from lm.convert import hf
  from lm.infer.load import load_run
  d = make_t5_checkpoint(tmp_path / 'hf')
  hf.convert_from_hf(d, tmp_path / 'lm')
  model, params, config, tok = load_run(tmp_path / 'lm')
  ev = harness.Evaluator(model, params, tok, config, batch_size=4)
  requests = [('translate: the cat', ' le chat'), ('summarize: a b c d e f', ' short')]
  got = ev.loglikelihood(requests)
  hf_t5 = transformers.T5ForConditionalGeneration.from_pretrained(d).eval()
  for (context, continuation), (ll, _) in zip(requests, got):
    inputs = sampling.encode_prompt(tok, context, 'encdec')  # the input ends with EOS
    assert inputs == transformers.AutoTokenizer.from_pretrained(d)(context).input_ids
    labels = tok.encode(context + continuation)[len(tok.encode(context)):]
    with torch.no_grad():
      loss = hf_t5(input_ids=torch.tensor([inputs]), labels=torch.tensor([labels])).loss
    assert ll == pytest.approx(-float(loss) * len(labels), rel=1e-4)
  records = [dict(input=c, references=['x']) for c, _ in requests]
  r = ev.run(tasks.Task('g', 'generation', records=records, max_new_tokens=5))
  for rec, s in zip(records, r.samples):
    out = sampling.generate(model, params, [sampling.encode_prompt(tok, rec['input'], 'encdec')],
                            max_new_tokens=5, temperature=0.0, eos_id=tok.eos_id)[0]
    assert s['output'] == tok.decode(out[:-1] if out and out[-1] == tok.eos_id else out)
  with pytest.raises(ValueError, match='Perplexity needs a decoder'):
    ev.run(tasks.Task('p', 'perplexity', records=[dict(text='a b c')]))


def test_tasks_during_training_on_the_mesh_equal_the_script(data_dir, tmp_path):
  from test_train import tiny_config
  from lm.infer.load import load_run
  from lm.train import trainer
  mc = tmp_path / 'mc.jsonl'
  mc.write_text(''.join(json.dumps(dict(context=f'def f{i}(', choices=['x):', 'self):', ')'],
                                        label=i % 3)) + '\n' for i in range(6)))
  c = tiny_config(data_dir, steps=4, eval_every=4)  # the mesh: all 8 (fake) devices
  c.eval.update(tasks=f'multiple_choice:{mc},bias_probe', limit=5, batch_size=4)
  trainer.train(c, tmp_path / 'run', log=lambda s: None)
  lines = [json.loads(x) for x in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  logged = next(x for x in lines if f'eval/multiple_choice:{mc}/acc' in x)
  assert logged['step'] == 4 and 'eval/loss' in logged
  assert 'eval/bias_probe/pct_stereotype' in logged
  model, params, config, tok = load_run(tmp_path / 'run')  # one device
  r = harness.Evaluator(model, params, tok, config, batch_size=4).run(
      tasks.resolve(f'multiple_choice:{mc}'), limit=5)
  assert logged[f'eval/multiple_choice:{mc}/acc'] == r.metrics['acc']
  assert logged[f'eval/multiple_choice:{mc}/acc_norm'] == r.metrics['acc_norm']


def test_task_from_a_tfds_catalog_dataset(tmp_path):
  """A task file naming a TFDS catalog dataset (a tiny one registered here, as glue/sst2
  would be downloaded), its features renamed to the record's fields."""
  import tensorflow_datasets as tfds

  class TinyEvalSst(tfds.core.GeneratorBasedBuilder):  # registered as 'tiny_eval_sst'
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'sentence': tfds.features.Text(), 'label': tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
      return {'validation': self._generate_examples(3)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {'sentence': f'sentence {i}', 'label': i % 2}

  (tmp_path / 't.yaml').write_text(f'kind: classification\ntfds: tiny_eval_sst\n'
                                   f'data_dir: {tmp_path}\nfields: {{text: sentence}}\n')
  task = tasks.resolve(str(tmp_path / 't.yaml'))
  assert sorted((r['text'], r['label']) for r in tasks.load_records(task)) == [
      ('sentence 0', 0), ('sentence 1', 1), ('sentence 2', 0)]
  with pytest.raises(ValueError, match="no split 'test'"):
    tasks.load_records(tasks.dataclasses.replace(task, split='test'))
