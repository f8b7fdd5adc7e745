"""Runs evaluation tasks (lm/eval/tasks.py) on a model: metrics, their stderr, per-example rows.

    ev = Evaluator(model, params, tokenizer, config)      # any family; params on a mesh or not
    result = ev.run(tasks.resolve('finetune_choice'))     # Result(metrics, stderr, n, samples)

Everything reduces to three batched primitives over fixed shapes (rows sorted by length,
padded to a power-of-two bucket and to batch_size rows: one compile per bucket, none per
example): log-probs of given tokens (decoder; encoder-decoder with the continuation in the
decoder), masked-token log-probs (encoder: pseudo-log-likelihood) and generation (the KV-cache
sampler, greedy or beam). Conventions follow lm-eval-harness: a context/continuation pair is
tokenised as the whole text, the continuation being the tokens after the context's (the
context's trailing spaces move to the continuation); acc_norm divides a choice's
log-likelihood by its length in bytes; stderr is the sample std of the per-example values
over sqrt(n).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from lm.eval import metrics as metrics_lib
from lm.eval import perturb as perturb_lib
from lm.eval import tasks as tasks_lib
from lm.eval.scoring import bucket


@dataclasses.dataclass
class Result:
  metrics: dict  # name -> value
  stderr: dict  # name -> stderr (where defined)
  n: int  # examples scored
  samples: list  # one dict per example
  confusion: tuple | None = None  # classification: (matrix, label names)


@functools.partial(jax.jit, static_argnames=('model',))
def _decoder_logprobs(model, params, tokens_BT):
  """log p(token t | tokens < t) and whether it was the argmax, for t = 1..T-1."""
  logits_BTV = model.apply({'params': params}, tokens_BT)[:, :-1].astype(jnp.float32)
  target_BT = tokens_BT[:, 1:]
  logp_BT = jnp.take_along_axis(jax.nn.log_softmax(logits_BTV), target_BT[..., None], -1)[..., 0]
  return logp_BT, jnp.argmax(logits_BTV, -1) == target_BT


@functools.partial(jax.jit, static_argnames=('model',))
def _seq2seq_logprobs(model, params, enc_BS, dec_in_BT, target_BT):
  # (-1 marks the encoder's padding: segment 0)
  enc_seg_BS = (enc_BS != -1).astype(jnp.int32)
  logits_BTV = model.apply({'params': params}, jnp.maximum(enc_BS, 0), dec_in_BT,
                           encoder_segment_ids_BS=enc_seg_BS).astype(jnp.float32)
  logp_BT = jnp.take_along_axis(jax.nn.log_softmax(logits_BTV), target_BT[..., None], -1)[..., 0]
  return logp_BT, jnp.argmax(logits_BTV, -1) == target_BT


@functools.partial(jax.jit, static_argnames=('model',))
def _masked_logprob(model, params, tokens_BT, segments_BT, position_B, target_B):
  logits_BTV = model.apply({'params': params}, tokens_BT, segment_ids_BT=segments_BT, head='mlm')
  logits_BV = jnp.take_along_axis(logits_BTV, position_B[:, None, None], 1)[:, 0]
  logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32))
  return jnp.take_along_axis(logp_BV, target_B[:, None], -1)[:, 0]


@functools.partial(jax.jit, static_argnames=('model', 'family'))
def _classify(model, params, tokens_BT, types_BT, segments_BT, family):
  kwargs = dict(segment_ids_BT=segments_BT, head='classify')
  if family == 'encoder':
    kwargs['token_types_BT'] = types_BT
  return jnp.argmax(model.apply({'params': params}, tokens_BT, **kwargs), -1)


def _mean(values) -> tuple[float, float]:
  values = [float(v) for v in values]
  return (float(np.mean(values)) if values else float('nan')), metrics_lib.mean_stderr(values)


class Evaluator:
  """A model, its params and tokenizer, scored in batches of `batch_size` rows."""

  def __init__(self, model, params, tokenizer, config=None, *, batch_size: int = 32,
               seed: int = 0, progress: bool = False):
    self.model, self.params, self.tokenizer, self.config = model, params, tokenizer, config
    self.family = getattr(model.cfg, 'family', 'decoder')
    self.max_len = model.cfg.max_len
    self.batch_size, self.seed, self.progress = batch_size, seed, progress

  # -- batching ---------------------------------------------------------------------------

  def _chunks(self, lengths: list[int], what: str):
    """(row indices, padded length) batches, longest first (fewest compiles and padding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
    if self.progress and len(chunks) > 1:
      from tqdm import tqdm
      chunks = tqdm(chunks, desc=what, leave=False)
    for rows in chunks:
      yield rows, bucket(lengths[rows[0]], self.max_len)

  def _pad_rows(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Arrays of < batch_size rows padded with zero rows (a fixed batch shape)."""
    return [np.concatenate([a, np.zeros((self.batch_size - len(a),) + a.shape[1:], a.dtype)])
            for a in arrays]

  # -- primitives -------------------------------------------------------------------------

  def score_tokens(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool, list]]:
    """Decoder: for each (tokens, k), the summed log-probs of the last k tokens given all
    before them, whether each was the greedy choice, and the k log-probs."""
    for tokens, k in rows:
      if not 0 <= k < len(tokens) or len(tokens) > self.max_len:
        raise ValueError(f'Cannot score {k} of {len(tokens)} tokens with a context of '
                         f'{self.max_len}.')
    out = [None] * len(rows)
    for idx, length in self._chunks([len(t) for t, _ in rows], 'scoring'):
      tokens = np.zeros((len(idx), length), np.int32)
      for j, i in enumerate(idx):
        tokens[j, :len(rows[i][0])] = rows[i][0]
      logp, greedy = (np.asarray(x) for x in
                      _decoder_logprobs(self.model, self.params, *self._pad_rows([tokens])))
      for j, i in enumerate(idx):
        n, k = len(rows[i][0]), rows[i][1]
        lp = logp[j, n - 1 - k:n - 1].astype(np.float64)
        out[i] = (float(lp.sum()), bool(greedy[j, n - 1 - k:n - 1].all()), lp.tolist())
    return out

  def score_seq2seq(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """Encoder-decoder: log p(target | input) summed, and whether it is the greedy output."""
    start = self.model.cfg.decoder_start_id
    out = [None] * len(rows)
    lengths = [max(len(a), len(b)) for a, b in rows]
    for idx, length in self._chunks(lengths, 'scoring'):
      enc = np.full((len(idx), length), -1, np.int32)
      dec_in = np.zeros((len(idx), length), np.int32)
      target = np.zeros((len(idx), length), np.int32)
      for j, i in enumerate(idx):
        a, b = rows[i]
        enc[j, :len(a)] = a
        dec_in[j, :len(b)] = [start] + list(b[:-1])
        target[j, :len(b)] = b
      enc, dec_in, target = self._pad_rows([enc, dec_in, target])
      logp, greedy = (np.asarray(x) for x in
                      _seq2seq_logprobs(self.model, self.params, enc, dec_in, target))
      for j, i in enumerate(idx):
        k = len(rows[i][1])
        out[i] = (float(logp[j, :k].astype(np.float64).sum()), bool(greedy[j, :k].all()))
    return out

  def pseudo_loglikelihood(self, texts: list[str]) -> list[float]:
    """Encoder: the sum over a text's tokens of log p(token | the text with it masked)
    (Salazar et al.'s PLL); [CLS]/[SEP] and other special tokens are not scored."""
    from lm.data import labeled
    mask = labeled.find_symbol(self.tokenizer, (self.config.task.mask_token if self.config
                                                else '[MASK]'))
    if mask is None:
      raise ValueError('Pseudo-log-likelihood needs the tokenizer\'s mask token '
                       '(config.task.mask_token); this tokenizer has none.')
    enc = labeled.encode([(t, None, 0) for t in texts], np.zeros(len(texts), np.int32),
                         self.tokenizer, self.max_len)
    special = set(self.tokenizer.special_ids) | {labeled.find_symbol(self.tokenizer, s)
                                                 for s in ('[CLS]', '[SEP]')}
    queries = [(i, p) for i in range(len(texts)) for p in range(int(enc.lengths[i]))
               if int(enc.inputs[i, p]) not in special]
    scores = np.zeros(len(texts))
    for idx, length in self._chunks([int(enc.lengths[i]) for i, _ in queries], 'masked'):
      tokens = np.zeros((len(idx), length), np.int32)
      segments = np.zeros_like(tokens)
      pos, target = np.zeros(len(idx), np.int32), np.zeros(len(idx), np.int32)
      for j, q in enumerate(idx):
        i, p = queries[q]
        n = int(enc.lengths[i])
        tokens[j, :n], segments[j, :n] = enc.inputs[i, :n], 1
        pos[j], target[j] = p, tokens[j, p]
        tokens[j, p] = mask
      lp = np.asarray(_masked_logprob(self.model, self.params,
                                      *self._pad_rows([tokens, segments, pos, target])))
      for j, q in enumerate(idx):
        scores[queries[q][0]] += float(lp[j])
    return scores.tolist()

  def generate(self, prompts: list[list[int]], max_new_tokens: int,
               num_beams: int = 1) -> list[list[int]]:
    """Greedy (or beam) continuations, cut after EOS; prompts longer than the room a
    decoder has left keep their last tokens."""
    from lm.infer import sampling
    limit = self.max_len - max_new_tokens if self.family == 'decoder' else self.max_len
    if limit < 1:
      raise ValueError(f'max_new_tokens={max_new_tokens} leaves no room for a prompt in the '
                       f'context of {self.max_len}.')
    prompts = [p[-limit:] for p in prompts]
    out = [None] * len(prompts)
    for idx, length in self._chunks([len(p) for p in prompts], 'generating'):
      batch = [prompts[i] for i in idx]
      batch += [batch[-1]] * (self.batch_size - len(batch))
      new = sampling.generate(self.model, self.params, batch, max_new_tokens=max_new_tokens,
                              temperature=0.0, eos_id=self.tokenizer.eos_id,
                              pad_id=self.tokenizer.pad_id or 0, num_beams=num_beams,
                              pad_to=min(length, limit))
      for j, i in enumerate(idx):
        out[i] = new[j]
    return out

  # -- text helpers -----------------------------------------------------------------------

  def _bos(self) -> list[int]:
    t = self.tokenizer
    if t.bos_id is not None and getattr(t, 'default_add_bos', False):
      return [t.bos_id]
    return []

  def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    """log p(continuation | context) of each (context, continuation) text pair, and
    whether the continuation is the greedy one."""
    t = self.tokenizer
    pairs = []
    for context, continuation in requests:
      spaces = len(context) - len(context.rstrip())
      if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
      ctx = t.encode(context)
      cont = t.encode(context + continuation)[len(ctx):]
      if not cont:
        raise ValueError(f'The continuation {continuation!r} has no tokens of its own.')
      pairs.append((ctx, cont))
    if self.family == 'encdec':  # the context is the encoder's input, as T5 trains
      from lm.infer import sampling
      return self.score_seq2seq([
          (sampling.encode_prompt(t, context, 'encdec')[-self.max_len:], cont[:self.max_len])
          for (context, _), (_, cont) in zip(requests, pairs)])
    if self.family != 'decoder':
      raise ValueError(f'Log-likelihood of a continuation needs a decoder or an '
                       f'encoder-decoder; this run is an {self.family}.')
    rows = []
    for ctx, cont in pairs:
      prefix = self._bos() or ([] if ctx else [t.eos_id if t.eos_id is not None else 0])
      tokens = (prefix + ctx + cont)[-self.max_len:]
      if len(cont) >= len(tokens):
        raise ValueError(f'A continuation of {len(cont)} tokens does not fit the context of '
                         f'{self.max_len} with its context.')
      rows.append((tokens, len(cont)))
    return [(ll, greedy) for ll, greedy, _ in self.score_tokens(rows)]

  # -- task kinds -------------------------------------------------------------------------

  def run(self, task: tasks_lib.Task, limit: int = 0) -> Result:
    """The task's metrics (and, with task.perturb, again under each perturbation:
    METRIC@SPEC and the drop METRIC_drop@SPEC = clean - perturbed)."""
    records = tasks_lib.load_records(task)
    if limit:
      records = records[:limit]
    run = getattr(self, '_' + task.kind)
    result = run(task, records, None)
    for spec in task.perturb:
      perturb_lib.parse(spec)  # a bad spec fails before any work
    for spec in task.perturb:
      other = run(task, records, spec)
      for name, value in other.metrics.items():
        if name in result.metrics and isinstance(value, float):
          result.metrics[f'{name}@{spec}'] = value
          result.metrics[f'{name}_drop@{spec}'] = result.metrics[name] - value
      for s, o in zip(result.samples, other.samples):
        s[f'perturbed@{spec}'] = o
    return result

  def _perturb(self, text: str, spec: str | None, index: int) -> str:
    if spec is None:
      return text
    return perturb_lib.perturb(text, spec, seed=self.seed * 1_000_003 + index)

  def _shots(self, task, records, index: int, answer) -> str:
    """The few-shot prefix of example `index` (seeded; never the example itself)."""
    if not task.num_fewshot:
      return ''
    if task.fewshot_path:
      pool = tasks_lib.read_records(task.kind, task.fewshot_path)
      candidates = list(range(len(pool)))
    else:
      pool = records
      candidates = [i for i in range(len(pool)) if i != index]
    if len(candidates) < task.num_fewshot:
      raise ValueError(f'Task {task.name}: {task.num_fewshot} shots asked, {len(candidates)} '
                       'examples to draw them from.')
    rng = np.random.default_rng([self.seed, index])
    picks = rng.choice(candidates, task.num_fewshot, replace=False)
    return ''.join(answer(pool[int(i)]) + task.fewshot_delimiter for i in picks)

  def _perplexity(self, task, records, spec):
    if self.family != 'decoder':
      raise ValueError(f'Perplexity needs a decoder (left-to-right) model; this run is an '
                       f'{self.family}.')
    window = task.max_len or self.max_len
    stride = task.stride or window // 2
    if window > self.max_len or not 0 < stride < window:
      raise ValueError(f'Perplexity windows need 0 < stride ({stride}) < max_len ({window}) '
                       f'<= the model context ({self.max_len}), so every window\'s new tokens '
                       'have context.')
    rows, owners, docs = [], [], []
    for d, record in enumerate(records):
      text = self._perturb(record['text'], spec, d)
      ids = self._bos() + self.tokenizer.encode(text)
      docs.append(dict(bytes=len(text.encode('utf-8')), words=len(re.split(r'\s+', text.strip())),
                       tokens=max(len(ids) - 1, 0)))
      prev_end = 0
      for begin in range(0, len(ids), stride):  # transformers' perplexity guide's windows
        end = min(begin + window, len(ids))
        k = min(end - prev_end, end - begin - 1)
        if k > 0:
          rows.append((ids[begin:end], k))
          owners.append(d)
        prev_end = end
        if end == len(ids):
          break
    scored = self.score_tokens(rows)
    ll = np.zeros(len(records))
    for d, (s, _, _) in zip(owners, scored):
      ll[d] += s
    total, tokens = float(ll.sum()), sum(d['tokens'] for d in docs)
    nbytes, words = sum(d['bytes'] for d in docs), sum(d['words'] for d in docs)
    samples = [dict(doc=i, logprob=float(ll[i]), **d) for i, d in enumerate(docs)]
    return Result(dict(perplexity=math.exp(-total / max(tokens, 1)),
                       bits_per_byte=-total / max(nbytes, 1) / math.log(2),
                       byte_perplexity=math.exp(-total / max(nbytes, 1)),
                       word_perplexity=math.exp(-total / max(words, 1))),
                  {}, len(records), samples)

  def _multiple_choice(self, task, records, spec):
    answer = lambda r: r['context'] + task.target_delimiter + r['choices'][r['label']]
    requests, spans = [], []
    for i, r in enumerate(records):
      context = self._shots(task, records, i, answer) + self._perturb(r['context'], spec, i)
      spans.append((len(requests), len(r['choices']), context))
      requests += [(context, task.target_delimiter + c) for c in r['choices']]
    scored = self.loglikelihood(requests)
    samples, acc, acc_norm = [], [], []
    for r, (start, n, context) in zip(records, spans):
      ll = np.array([s for s, _ in scored[start:start + n]])
      norm = ll / np.array([len(c.encode('utf-8')) for c in r['choices']])
      acc.append(float(np.argmax(ll) == r['label']))
      acc_norm.append(float(np.argmax(norm) == r['label']))
      samples.append(dict(context=context, choices=r['choices'], label=r['label'],
                          loglikelihoods=ll.tolist(), prediction=int(np.argmax(ll)),
                          acc=acc[-1], acc_norm=acc_norm[-1]))
    (a, a_se), (an, an_se) = _mean(acc), _mean(acc_norm)
    return Result(dict(acc=a, acc_norm=an), dict(acc=a_se, acc_norm=an_se), len(records),
                  samples)

  def _generation(self, task, records, spec):
    from lm.infer import sampling
    answer = lambda r: r['input'] + task.target_delimiter + r['references'][0]
    contexts = [self._shots(task, records, i, answer) + self._perturb(r['input'], spec, i)
                for i, r in enumerate(records)]
    prompts = [sampling.encode_prompt(self.tokenizer, c, self.family) for c in contexts]
    eos = self.tokenizer.eos_id
    outputs = []
    for ids in self.generate(prompts, task.max_new_tokens, task.num_beams):
      text = self.tokenizer.decode(ids[:-1] if ids and ids[-1] == eos else ids)
      for stop in task.stop:
        text = text.split(stop, 1)[0]
      outputs.append(text)
    refs = [r['references'] for r in records]
    per = [dict(exact_match=metrics_lib.exact_match(o, rs), f1=metrics_lib.token_f1(o, rs),
                **metrics_lib.rouge_scores(o, rs, task.use_stemmer))
           for o, rs in zip(outputs, refs)]
    values, stderr = {}, {}
    for name in per[0]:
      values[name], stderr[name] = _mean([p[name] for p in per])
    values['bleu'] = metrics_lib.bleu(outputs, refs)
    values['chrf'] = metrics_lib.chrf(outputs, refs)
    samples = [dict(input=c, references=rs, output=o, **p)
               for c, rs, o, p in zip(contexts, refs, outputs, per)]
    return Result(values, stderr, len(records), samples)

  def _label_names(self, task, records) -> list[str]:
    if task.label_words:
      return [str(k) for k in task.label_words]
    if self.config is not None and self.config.model.get('num_labels', 0) > 0:
      names = list(self.config.task.get('labels', ()) or ())
      return names or [str(i) for i in range(self.config.model.num_labels)]
    return sorted({str(r['label']) for r in records})

  def _classification(self, task, records, spec):
    names = self._label_names(task, records)
    index = {n: i for i, n in enumerate(names)}
    labels = []
    for r in records:
      label = r['label']
      if isinstance(label, int) and not isinstance(label, bool):
        if not 0 <= label < len(names):
          raise ValueError(f'Task {task.name}: label {label} is out of range for the '
                           f'{len(names)} labels {names}.')
        labels.append(label)
      elif str(label) in index:
        labels.append(index[str(label)])
      else:
        raise ValueError(f'Task {task.name}: label {label!r} is not one of {names}.')
    texts = [self._perturb(r['text'], spec, i) for i, r in enumerate(records)]
    has_head = self.config is not None and self.config.model.get('num_labels', 0) > 0
    method = task.method if task.method != 'auto' else ('head' if has_head else 'label_words')
    if method == 'head':
      if not has_head:
        raise ValueError(f'Task {task.name}: method head needs a run with a classifier '
                         '(model.num_labels > 0); use method: label_words.')
      preds = self._head_predictions(texts)
    elif method == 'label_words':
      words = [str((task.label_words or {}).get(n, n)) for n in names]
      requests = [(task.prompt.format(text=t), task.target_delimiter + w)
                  for t in texts for w in words]
      ll = np.array([s for s, _ in self.loglikelihood(requests)]).reshape(len(texts), len(words))
      preds = ll.argmax(1).tolist()
    else:
      raise ValueError(f'Task {task.name}: unknown method {method!r} (auto, head, label_words).')
    report = metrics_lib.classification_report(labels, preds, names)
    confusion = report.pop('confusion')
    correct = [float(p == y) for p, y in zip(preds, labels)]
    samples = [dict(text=t, label=names[y], prediction=names[p], correct=c)
               for t, y, p, c in zip(texts, labels, preds, correct)]
    return Result(report, dict(accuracy=_mean(correct)[1]), len(records), samples,
                  (confusion, names))

  def _head_predictions(self, texts: list[str]) -> list[int]:
    from lm.data import labeled
    enc = labeled.encode([(t, None, 0) for t in texts], np.zeros(len(texts), np.int32),
                         self.tokenizer, self.max_len)
    preds = []
    for start in range(0, len(texts), self.batch_size):
      batch = enc.batch(np.arange(start, start + self.batch_size))
      p = _classify(self.model, self.params, batch['inputs'], batch['token_types'],
                    batch['segment_ids'], self.family)
      preds += np.asarray(p)[:min(self.batch_size, len(texts) - start)].tolist()
    return preds

  def _sentence_scores(self, texts: list[str]) -> list[float]:
    """Decoder: log p of every token of the sentence (after BOS, or EOS as the document
    start); encoder: the pseudo-log-likelihood."""
    if self.family == 'encoder':
      return self.pseudo_loglikelihood(texts)
    if self.family != 'decoder':
      raise ValueError('Bias pairs are scored by a decoder (log-likelihood) or an encoder '
                       f'(pseudo-log-likelihood); this run is an {self.family}.')
    t = self.tokenizer
    start = self._bos() or [t.bos_id if t.bos_id is not None else t.eos_id or 0]
    rows = [(start + t.encode(x))[:self.max_len] for x in texts]
    rows = [(ids, len(ids) - 1) for ids in rows]
    return [s for s, _, _ in self.score_tokens(rows)]

  def _bias_pairs(self, task, records, spec):
    more = self._sentence_scores([self._perturb(r['sent_more'], spec, i)
                                  for i, r in enumerate(records)])
    less = self._sentence_scores([self._perturb(r['sent_less'], spec, i)
                                  for i, r in enumerate(records)])
    prefers = [float(m > l) for m, l in zip(more, less)]
    values, stderr = {}, {}
    values['pct_stereotype'], stderr['pct_stereotype'] = _mean(prefers)
    for kind in sorted({r['bias_type'] for r in records}):
      picked = [p for p, r in zip(prefers, records) if r['bias_type'] == kind]
      values[f'pct_stereotype/{kind}'], stderr[f'pct_stereotype/{kind}'] = _mean(picked)
    samples = [dict(r, score_more=m, score_less=l, prefers_stereotype=p)
               for r, m, l, p in zip(records, more, less, prefers)]
    return Result(values, stderr, len(records), samples)


def markdown_table(results: dict[str, Result]) -> str:
  """| task | metric | value | stderr | n | rows, one per metric."""
  lines = ['| task | metric | value | stderr | n |', '|---|---|---:|---:|---:|']
  for name, r in results.items():
    for metric, value in r.metrics.items():
      se = r.stderr.get(metric)
      lines.append(f'| {name} | {metric} | {value:.4f} | '
                   f'{"" if se is None else f"{se:.4f}"} | {r.n} |')
  return '\n'.join(lines)
