"""Task sft: supervised instruction fine-tuning of a decoder or a T5 (lm/data/instruct.py).

The causal LM loss on the trained tokens only (completions / assistant turns and their EOS),
over packed rows whose examples never attend to each other. data.path: JSON lines of
{"prompt", "completion"} or {"messages": [...]} records (eval: data.eval_path, or the last
data.val_fraction of them); "" -> the embedded fine-tuning set (lm/data/finetune_sets.py).
Start from pre-trained weights with config.init_from; config.peft picks the method. An
encoder-decoder reads the prompt in its encoder and learns the target in its decoder.

task.prompt_loss_weight > 0 trains the prompt's tokens too, at that weight (a decoder; as
OpenAI's fine-tuning prompt_loss_weight): a reader that must copy from its prompt learns
to sooner (lm/rag). Eval stays on the trained tokens alone.

Eval: eval/loss (per trained token; the best checkpoint keeps its lowest), eval/perplexity,
eval/accuracy (argmax of the trained tokens) and eval/exact_match: the share of eval examples
whose trained tokens are all argmax-correct under teacher forcing, which is exactly whether
greedy decoding from the prompt reproduces the completion and its EOS (for a messages
record: every assistant turn, each given the gold turns before it). Counted per example as
sums, so eval over many batches and processes is exact; lm/eval/exact_match.py checks it by
generating.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lm.train import tasks


def example_exact(pred_BT, batch) -> tuple[jax.Array, jax.Array]:
  """(examples whose trained tokens are all predicted, examples with a trained token) in
  the batch: a segment sum over ids row * (T + 1) + segment id."""
  b, t = pred_BT.shape
  trained_BT = batch['weights'] > 0
  wrong_BT = trained_BT & (pred_BT != batch['targets'])
  ids = (jnp.arange(b)[:, None] * (t + 1) + batch['segment_ids']).reshape(-1)
  count = lambda x_BT: jax.ops.segment_sum(x_BT.reshape(-1).astype(jnp.int32), ids,
                                           num_segments=b * (t + 1))
  has_S, bad_S = count(trained_BT) > 0, count(wrong_BT) > 0
  return (jnp.sum(has_S & ~bad_S).astype(jnp.float32), jnp.sum(has_S).astype(jnp.float32))


class SFT(tasks.CausalLM):
  """Instruction SFT (module docstring). Batches: CausalLM's; for an encoder-decoder
  SpanCorruption's plus decoder_positions (lm/data/instruct.py Seq2SeqExamples)."""
  name = 'sft'

  def __init__(self, config):
    super().__init__(config)
    family = config.model.get('family', 'decoder')
    if family not in ('decoder', 'encdec'):
      raise ValueError(f'task sft needs model.family decoder or encdec, not {family!r}.')
    self.seq2seq = family == 'encdec'

  def batch_spec(self):
    if not self.seq2seq:
      return super().batch_spec()
    b, m = self.config.train.batch_size, self.config.model
    enc, dec = (b, m.max_len), (b, m.max_target_len)
    return dict(encoder_inputs=(enc, np.int32), encoder_segment_ids=(enc, np.int32),
                decoder_inputs=(dec, np.int32), decoder_targets=(dec, np.int32),
                decoder_segment_ids=(dec, np.int32), decoder_positions=(dec, np.int32),
                decoder_weights=(dec, np.float32))

  def _logits(self, model, params, batch, rng, deterministic):
    """Logits [B, T, V] and the batch under CausalLM's names (targets, weights, segments)."""
    if not self.seq2seq:
      return tasks._forward(model, params, batch, rng, deterministic), batch
    logits_BTV = model.apply(
        {'params': params}, batch['encoder_inputs'], batch['decoder_inputs'],
        encoder_segment_ids_BS=batch['encoder_segment_ids'],
        decoder_segment_ids_BT=batch['decoder_segment_ids'],
        decoder_positions_BT=batch['decoder_positions'], deterministic=deterministic,
        rngs=None if deterministic or rng is None else {'dropout': rng})
    return logits_BTV, dict(targets=batch['decoder_targets'], weights=batch['decoder_weights'],
                            segment_ids=batch['decoder_segment_ids'])

  def loss(self, model, params, extra, batch, rng, deterministic):
    if not self.seq2seq:
      w = self.config.task.get('prompt_loss_weight', 0.0)
      if w:  # the prompt's tokens too, at weight w (each predicted within its example)
        seg_BT = batch['segment_ids']
        same_BT = jnp.concatenate([seg_BT[:, 1:] == seg_BT[:, :-1],
                                   jnp.zeros_like(seg_BT[:, :1], bool)], 1) & (seg_BT > 0)
        batch = dict(batch, weights=jnp.where(batch['weights'] > 0, batch['weights'],
                                              w * same_BT))
      return super().loss(model, params, extra, batch, rng, deterministic)
    logits_BTV, b = self._logits(model, params, batch, rng, deterministic)
    s, w, _ = tasks._token_loss(logits_BTV, b['targets'], b['weights'])
    return s, w, {}

  def data_iter(self, tokenizer, split, num_batches=None):
    from lm.data import instruct  # lazy: lm.data imports the tokenizers
    if split == 'train':
      return instruct.make_train_iter(self.config, tokenizer)
    return instruct.make_eval_iter(self.config, tokenizer, num_batches)

  def eval_stats(self, model, params, extra, batch):
    del extra
    # pylint: disable=protected-access  (the same forward and token loss as the other tasks)
    logits_BTV, batch = self._logits(model, params, batch, None, True)
    loss, weight, correct = tasks._token_loss(logits_BTV, batch['targets'], batch['weights'])
    exact, examples = example_exact(jnp.argmax(logits_BTV, -1), batch)
    return {'loss_sum': loss, 'weight': weight, 'correct': correct, 'exact': exact,
            'examples': examples}

  def eval_metrics(self, stats):
    weight = max(stats['weight'], 1.0)
    loss = stats['loss_sum'] / weight
    return {'eval/loss': loss, 'eval/perplexity': math.exp(min(loss, 50.0)),
            'eval/accuracy': stats['correct'] / weight,
            'eval/exact_match': stats['exact'] / max(stats['examples'], 1.0)}


tasks.register(SFT)
