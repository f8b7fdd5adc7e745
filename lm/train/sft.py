"""Task sft: supervised instruction fine-tuning of a decoder (lm/data/instruct.py's data).

The causal LM loss on the trained tokens only (completions / assistant turns and their EOS),
over packed rows whose examples never attend to each other. data.path: JSON lines of
{"prompt", "completion"} or {"messages": [...]} records (eval: data.eval_path, or the last
data.val_fraction of them); "" -> the embedded fine-tuning set (lm/data/finetune_sets.py).
Start from pre-trained weights with config.init_from; config.peft picks the method.

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
  """Instruction SFT (module docstring). Batches: CausalLM's."""
  name = 'sft'

  def __init__(self, config):
    super().__init__(config)
    family = config.model.get('family', 'decoder')
    if family != 'decoder':
      raise ValueError(f'task sft needs model.family=decoder, not {family!r}.')

  def data_iter(self, tokenizer, split, num_batches=None):
    from lm.data import instruct  # lazy: lm.data imports the tokenizers
    if split == 'train':
      return instruct.make_train_iter(self.config, tokenizer)
    return instruct.make_eval_iter(self.config, tokenizer, num_batches)

  def eval_stats(self, model, params, extra, batch):
    del extra
    # pylint: disable=protected-access  (the same forward and token loss as the other tasks)
    logits_BTV = tasks._forward(model, params, batch, None, True)
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
