"""Instruction SFT data and task: the loss mask token by token (chat templates, prompt/
completion), packing that never crosses examples (logits equal alone and packed), the
embedded fine-tuning set, errors naming file:line, resumable iteration, and task sft's
teacher-forced eval/exact_match equal to greedy generation's exact match."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.config import base_config
from lm.data import finetune_sets, instruct
from lm.data.tokenizers import ByteTokenizer
from lm.eval import exact_match
from lm.train import flops
from lm.train import metrics as metrics_lib
from lm.train import sft, tasks, trainer

TOK = ByteTokenizer()
EOS = TOK.eos_id
CHAT = [dict(role='system', content='be brief'), dict(role='user', content='hi'),
        dict(role='assistant', content='yo!'), dict(role='user', content='2+2?'),
        dict(role='assistant', content='4')]


def write_jsonl(path, records):
  path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in records))
  return path


def sft_config(path='', eval_path='', max_len=64, **task):
  c = base_config('decoder')
  c.task.name = 'sft'
  c.task.update(task)
  c.model.update(vocab_size=0, max_len=max_len, d_model=32, n_layers=1, n_heads=2)
  c.data.update(tokenizer='bytes', path=str(path), eval_path=str(eval_path))
  c.train.update(batch_size=4, seed=0)
  return c


def trained_bytes(tokens, trained):
  return [int(t) for t, w in zip(tokens, trained) if w]


# -- the loss mask -----------------------------------------------------------------------

def test_messages_mask_is_exactly_the_assistant_turns_and_eos():
  r = instruct.parse_record({'messages': CHAT}, 'x:1')
  tokens, trained = instruct.encode_record(r, TOK)  # the default template
  text = 'System: be brief\nUser: hi\nAssistant: yo!'
  want = TOK.encode(text) + [EOS] + TOK.encode('User: 2+2?\nAssistant: 4') + [EOS]
  assert tokens.tolist() == want
  assert trained_bytes(tokens, trained) == TOK.encode('yo!') + [EOS] + TOK.encode('4') + [EOS]
  first = len(TOK.encode(text)) - 3  # 'yo!' starts there
  np.testing.assert_array_equal(np.nonzero(trained)[0][:4], first + np.arange(4))
  # A Llama-2 style template given as text: BOS / EOS markers become the ids, the space
  # before each answer is part of the assistant's piece.
  llama = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
           "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}"
           "{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
  template = instruct.chat_template(sft_config(chat_template=llama), TOK)
  tokens, trained = instruct.encode_record(r, TOK, template)
  assert tokens[0] == TOK.bos_id and tokens[-1] == EOS
  assert trained_bytes(tokens, trained) == TOK.encode(' yo!') + [EOS] + TOK.encode(' 4') + [EOS]
  assert TOK.decode(tokens) == '[INST] hi [/INST] yo![INST] 2+2? [/INST] 4'
  prompt, target = instruct.prompt_and_target(r, TOK, template)
  assert target == TOK.encode(' 4') + [EOS] and prompt == tokens[:-3].tolist()
  # A template that is not prefix-stable is refused, naming the record.
  unstable = instruct.ChatTemplate("{{ messages|length }}{% for m in messages %}"
                                   "{{ m['content'] }}{% endfor %}", 'T')
  with pytest.raises(ValueError, match='x:1: T is not prefix-stable'):
    instruct.encode_record(r, TOK, unstable)


def test_template_choice_config_then_tokenizer_then_default(tmp_path):
  class HFLike(ByteTokenizer):  # an imported HF tokenizer keeps its directory
    directory = tmp_path
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
      {'chat_template': "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"}))
  r = instruct.parse_record({'messages': CHAT[1:3]}, 'x:1')
  render = lambda c, tok: instruct.chat_template(c, tok).render(r.messages)
  assert render(sft_config(), HFLike()) == '<hi><yo!>'
  (tmp_path / 'own.jinja').write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
  assert render(sft_config(chat_template=str(tmp_path / 'own.jinja')), HFLike()) == '[hi][yo!]'
  assert render(sft_config(), TOK) == 'User: hi\nAssistant: yo!' + instruct.EOS_MARK
  with pytest.raises(ValueError, match='neither a Jinja template'):
    instruct.chat_template(sft_config(chat_template='nope.jinja'), TOK)


def test_prompt_completion_mask():
  r = instruct.parse_record({'prompt': 'add: 1 + 2\n', 'completion': '3'}, 'x:1')
  tokens, trained = instruct.encode_record(r, TOK)
  assert tokens.tolist() == TOK.encode('add: 1 + 2\n3') + [EOS]  # no BOS: bytes adds none
  assert trained.tolist() == [False] * 11 + [True, True]


def test_errors_name_file_and_line(tmp_path):
  good = {'prompt': 'a', 'completion': 'b'}
  cases = [({'prompt': 'a'}, 'neither'), ('not json', 'not valid JSON'),
           ({'messages': [{'role': 'human', 'content': 'x'}]}, "unknown role 'human'"),
           ({'messages': [{'role': 'user', 'content': 'x'}]}, 'no assistant turn')]
  for bad, match in cases:
    path = write_jsonl(tmp_path / 'd.jsonl', [good, bad])
    with pytest.raises(ValueError, match=rf'd.jsonl:2\b.*{match}'):
      instruct.read_records(str(path))
  path = write_jsonl(tmp_path / 'long.jsonl', [good, {'prompt': 'x' * 20, 'completion': 'y'}])
  with pytest.raises(ValueError, match=r'long.jsonl:2: the prompt alone has 20 tokens'):
    instruct.load_examples(sft_config(path, path, max_len=16), TOK, True)


# -- the embedded set ----------------------------------------------------------------------

def solve(prompt):
  """The answer, recomputed from the prompt's text alone."""
  kind, _, rest = prompt.rstrip('\n').partition(': ')
  if kind == 'add':
    a, b = rest.split(' + ')
    return str(int(a) + int(b))
  if kind == 'reverse':
    return ' '.join(rest.split()[::-1])
  if kind == 'sort':
    return ' '.join(sorted(rest.split()))
  field = re.fullmatch(r'field (\w+) of', kind).group(1)
  return re.search(rf"{field}='?(\w+)", rest).group(1)


def test_embedded_set_is_deterministic_disjoint_and_correct(tmp_path):
  train, ev = finetune_sets.make(400, 40)
  assert (train, ev) == finetune_sets.make(400, 40)
  assert finetune_sets.make(100, 40)[1] == ev  # eval does not move with the train size
  assert not {r['prompt'] for r in train} & {r['prompt'] for r in ev}
  assert len({r['prompt'] for r in train}) == 400
  for r in train + ev:
    assert solve(r['prompt']) == r['completion'] and len(r['prompt'] + r['completion']) < 80
  assert {r['prompt'].split(':')[0].split(' ')[0] for r in ev} == {'add', 'reverse', 'sort',
                                                                   'field'}
  finetune_sets.main([f'--out={tmp_path}', '--train=20', '--eval=5'])
  got = instruct.read_records(str(tmp_path / 'eval.jsonl'))
  assert [(g.prompt, g.completion) for g in got] == [
      (r['prompt'], r['completion']) for r in finetune_sets.make(20, 5)[1]]


# -- packing and iteration ----------------------------------------------------------------

def check_rows(batch, examples):
  """Segments restart ids/positions, are whole examples, and train exactly their trained
  tokens; returns (row, segment, example index) of every segment."""
  whole = {tuple(examples.tokens[a:b]): e
           for e, (a, b) in enumerate(zip(examples.offsets[:-1], examples.offsets[1:]))}
  found = []
  for r in range(len(batch['inputs'])):
    seg = batch['segment_ids'][r]
    n = int((seg > 0).sum())
    assert (seg[:n] > 0).all() and (seg[n:] == 0).all() and batch['weights'][r, n:].sum() == 0
    assert (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all()
    for s in range(1, int(seg.max(initial=0)) + 1):
      at = np.nonzero(seg == s)[0]
      assert batch['positions'][r, at].tolist() == list(range(len(at)))
      e = whole[tuple(batch['inputs'][r, at])]  # a whole example, never split
      lo, hi = examples.offsets[e], examples.offsets[e + 1]
      np.testing.assert_array_equal(batch['weights'][r, at[:-1]], examples.trained[lo + 1:hi])
      np.testing.assert_array_equal(batch['targets'][r, at[:-1]], examples.tokens[lo + 1:hi])
      assert batch['weights'][r, at[-1]] == 0
      found.append((r, s, e))
  return found


def test_iteration_packs_shuffles_and_resumes_bitwise():
  c = sft_config(finetune_examples=30, finetune_eval=9)
  examples = instruct.load_examples(c, TOK, True)
  it = instruct.make_train_iter(c, TOK, 0, 1)
  batches = [next(it) for _ in range(4)]
  state = it.get_state()
  more = [next(it) for _ in range(8)]  # several epochs of 30 examples
  seen = [e for b in batches + more for _, _, e in check_rows(b, examples)]
  assert sorted(seen[:30]) == list(range(30))  # epoch 0: each example once
  assert max(s for b in batches for s in b['segment_ids'].max(1)) >= 2  # rows hold several
  it2 = instruct.make_train_iter(c, TOK, 0, 1)
  it2.set_state(state)
  for want in more:
    jax.tree.map(np.testing.assert_array_equal, next(it2), want)
  stream = [e for b in batches + more for _, _, e in check_rows(b, examples)]
  assert seen == stream and stream[:30] != stream[30:60]  # reshuffled each epoch
  # Eval: one ordered pass, every example once, the last batch padded with empty rows.
  eval_examples = instruct.load_examples(c, TOK, False)
  evals = list(instruct.make_eval_iter(c, TOK, None, 0, 1))
  got = [e for b in evals for _, _, e in check_rows(b, eval_examples)]
  assert got == list(range(9)) and (evals[-1]['segment_ids'][-1] == 0).all()


# -- the task: training, exact match, packed logits ----------------------------------------

@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A tiny decoder trained 60 steps on 12 sums; eval on 6 of them and 6 new ones."""
  old = jax.config.jax_default_prng_impl
  jax.config.update('jax_default_prng_impl', 'rbg')  # compiles the init faster
  tmp = tmp_path_factory.mktemp('sft')
  rng = np.random.default_rng(0)
  train = [finetune_sets.example('add', rng) for _ in range(12)]
  ev = train[:6] + [finetune_sets.example('add', rng) for _ in range(6)]
  c = sft_config(write_jsonl(tmp / 'train.jsonl', train), write_jsonl(tmp / 'eval.jsonl', ev))
  c.train.update(steps=60, log_every=20, eval_every=60, eval_steps=0)
  c.optimizer.update(warmup_steps=5, lr=1e-2, decay_steps=60)
  c.checkpoint.update(every_steps=1000, keep=1, async_save=False)
  with pytest.MonkeyPatch.context() as mp:  # no plot, no timed peak matmul (seconds each)
    mp.setattr(metrics_lib, 'plot_losses', lambda workdir: None)
    mp.setattr(flops, 'mesh_peak_flops_per_sec', lambda mesh: (1e12, 'test'))
    out = trainer.train(c, tmp / 'run', log=lambda s: None, devices=jax.devices()[:1])
  jax.config.update('jax_default_prng_impl', old)
  records = metrics_lib.read_metrics(tmp / 'run')
  return dict(out=out, ev=ev, c=c, metrics=[r for r in records if 'eval/loss' in r][-1],
              params=jax.device_get(out['state']['params']))


def test_sft_exact_match_is_greedy_generations(run):
  model, params, ev = run['out']['setup'].model, run['params'], run['ev']
  acc, results = exact_match.exact_match(model, params, TOK, ev)
  assert 0 < acc < 1, results  # some memorised, some not: the comparison means something
  assert run['metrics']['eval/exact_match'] == pytest.approx(acc)
  assert [r['expected'] for r in results] == [r['completion'] for r in ev]
  # Sampled answers (scripts/exact_match.py --samples): near-zero temperature is greedy; a hot
  # one is not, and its seed matters.
  cold = exact_match.exact_match(model, params, TOK, ev, temperature=1e-4, seed=3)[1]
  assert [r['generated'] for r in cold] == [r['generated'] for r in results]
  hot = [[r['generated'] for r in exact_match.exact_match(model, params, TOK, ev,
                                                          temperature=5.0, seed=k)[1]]
         for k in (0, 1)]
  assert hot[0] != hot[1] and hot[0] != [r['generated'] for r in results]
  # Per example: all trained tokens argmax-right under teacher forcing <=> generation right.
  c = run['c']
  examples = instruct.load_examples(c, TOK, False)
  batch = next(iter(instruct.make_eval_iter(c, TOK, None, 0, 1)))
  forward = jax.jit(lambda b: model.apply({'params': params}, b['inputs'],
                                          segment_ids_BT=b['segment_ids'],
                                          positions_BT=b['positions']))
  logits = np.asarray(forward(batch))
  pred = logits.argmax(-1)
  forced, where = {}, {}
  for r, s, e in check_rows(batch, examples):
    w = (batch['segment_ids'][r] == s) & (batch['weights'][r] > 0)
    forced[e], where[e] = bool((pred[r][w] == batch['targets'][r][w]).all()), (r, s)
  assert [forced[e] for e in range(len(ev))] == [r['correct'] for r in results]
  exact, count = sft.example_exact(jnp.asarray(pred), batch)
  assert (float(exact), float(count)) == (sum(forced.values()), len(ev))
  # Packed logits equal each example's logits alone in a row: attention never crosses
  # examples (rows 0 and 1 hold several).
  packed = [e for e in range(len(ev)) if where[e][0] < 2]
  assert len(packed) > 2
  alone = np.asarray(forward(examples.batch([np.array([e]) for e in packed[:4]])))
  for i, e in enumerate(packed[:4]):
    r, s = where[e]
    at = batch['segment_ids'][r] == s
    np.testing.assert_allclose(logits[r][at], alone[i][:at.sum()], atol=1e-5, rtol=1e-5)


def test_sft_task_is_registered_and_keeps_eval_loss_best(run):
  task = tasks.get_task(run['c'])
  assert isinstance(task, sft.SFT) and task.best_metric == 'eval/loss'
  assert set(run['metrics']) >= {'eval/loss', 'eval/accuracy', 'eval/exact_match'}
  c = base_config('encoder')
  c.task.name = 'sft'
  with pytest.raises(ValueError, match='model.family decoder or encdec'):
    tasks.get_task(c)


def test_t5_sft_reads_prompts_in_the_encoder_and_its_exact_match_is_greedy(tmp_path):
  """A T5 learns the target in its decoder from the prompt in its encoder: the batch layout
  token by token, packed side by side; its teacher-forced exact match is greedy decoding's."""
  rng = np.random.default_rng(0)
  train = [finetune_sets.example('reverse', rng) for _ in range(8)]
  c = base_config('encdec')
  c.task.name = 'sft'
  c.model.update(vocab_size=0, max_len=64, max_target_len=40, d_model=32, n_layers=1,
                 n_heads=2, decoder_start_id=TOK.pad_id)
  path = write_jsonl(tmp_path / 't.jsonl', train)
  c.data.update(tokenizer='bytes', path=str(path), eval_path=str(path))
  c.train.update(batch_size=2, seed=0, steps=30, log_every=1, eval_every=30, eval_steps=0)
  c.optimizer.update(warmup_steps=4, lr=1e-2, decay_steps=30)
  c.checkpoint.update(every_steps=1000, keep=1, async_save=False)
  examples = instruct.load_examples(c, TOK, False)
  prompt, target = instruct.prompt_and_target(instruct.parse_record(train[0], 'x'), TOK)
  assert examples.inputs[0].tolist() == prompt and examples.targets[0].tolist() == target
  batch = next(iter(instruct.make_eval_iter(c, TOK, None, 0, 1)))
  assert batch['encoder_segment_ids'][0].max() >= 2  # several examples share a row
  for r in range(2):
    for s in range(1, batch['encoder_segment_ids'][r].max() + 1):
      e = [i for i in range(len(examples)) if examples.inputs[i].tolist() == batch[
          'encoder_inputs'][r][batch['encoder_segment_ids'][r] == s].tolist()][0]
      at = batch['decoder_segment_ids'][r] == s
      assert batch['decoder_targets'][r][at].tolist() == examples.targets[e].tolist()
      assert batch['decoder_inputs'][r][at].tolist() == [TOK.pad_id] + examples.targets[e][
          :-1].tolist()
      assert batch['decoder_positions'][r][at].tolist() == list(range(at.sum()))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(metrics_lib, 'plot_losses', lambda workdir: None)
    mp.setattr(flops, 'mesh_peak_flops_per_sec', lambda mesh: (1e12, 'test'))
    out = trainer.train(c, tmp_path / 'run', log=lambda s: None, devices=jax.devices()[:1])
  records = metrics_lib.read_metrics(tmp_path / 'run')
  losses = [r['train/loss'] for r in records if 'train/loss' in r]
  assert losses[-1] < 0.5 * losses[0]  # it learns from the targets it is given
  metrics = [r for r in records if 'eval/loss' in r][-1]
  acc, _ = exact_match.exact_match(out['setup'].model, jax.device_get(out['state']['params']),
                                   TOK, train)
  assert metrics['eval/exact_match'] == pytest.approx(acc)


def test_prompt_loss_weight_trains_the_prompt_tokens_at_that_weight(run):
  model, params, c = run['out']['setup'].model, run['params'], run['c'].copy_and_resolve_references()
  batch = jax.tree.map(jnp.asarray, next(iter(instruct.make_eval_iter(c, TOK, None, 0, 1))))
  c.task.prompt_loss_weight = 0.25
  s, w, _ = sft.SFT(c).loss(model, params, {}, batch, None, True)
  logp = jax.nn.log_softmax(np.asarray(model.apply(
      {'params': params}, batch['inputs'], segment_ids_BT=batch['segment_ids'],
      positions_BT=batch['positions'])), -1)
  nll = -np.take_along_axis(np.asarray(logp), np.asarray(batch['targets'])[..., None], -1)[..., 0]
  seg, done = np.asarray(batch['segment_ids']), np.asarray(batch['weights'])
  want_w = np.zeros_like(done)
  for r in range(seg.shape[0]):  # by hand: 1 on completions, 0.25 on the other next tokens
    for t in range(seg.shape[1] - 1):
      if seg[r, t] > 0 and seg[r, t + 1] == seg[r, t]:
        want_w[r, t] = 1.0 if done[r, t] > 0 else 0.25
  assert done.sum() < want_w.sum() < 0.25 * (seg > 0).sum() + done.sum()
  np.testing.assert_allclose(float(w), want_w.sum(), rtol=1e-6)
  np.testing.assert_allclose(float(s), (nll * want_w).sum(), rtol=1e-4)
