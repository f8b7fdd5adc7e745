"""Exact match of greedy generation on held-out instruction examples; one JSON line.

  python scripts/exact_match.py --workdir=runs/NAME [--data=eval.jsonl] [--num=200]
  python scripts/exact_match.py --workdir=runs/grpo --samples=16 --against=runs/sft

workdir: any run (a pre-trained base, a full fine-tune, an adapter run: its base comes
from its config.init_from). data: JSON lines of {"prompt", "completion"} or
{"messages": [...]}; default: the embedded fine-tuning set's held-out examples
(lm/data/finetune_sets.py, task.finetune_eval of them). Prints accuracy, a few misses.
--samples=N: also the mean exact match of N answers a prompt sampled at --temperature (an RL
policy's expected reward). --against=RUN: the same for a second run on the same examples
and samples' seeds, and the differences (this run - that one) with their paired standard
errors over the examples.
"""
import json

from absl import app, flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory.')
_DATA = flags.DEFINE_string('data', '', 'Instruction JSON lines ("": the embedded held-out set).')
_NUM = flags.DEFINE_integer('num', 0, 'Examples to score (0: all).')
_SHOW = flags.DEFINE_integer('show', 3, 'Misses to print.')
_SAMPLES = flags.DEFINE_integer('samples', 0, 'Sampled answers a prompt (0: greedy only).')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Sampling temperature (--samples).')
_AGAINST = flags.DEFINE_string('against', '', 'A second run to compare, example by example.')


def scores(workdir, examples):
  """(greedy 0/1 [N], mean of --samples sampled 0/1 [N] or None, greedy results)."""
  import numpy as np
  from lm.data import instruct
  from lm.eval import exact_match
  from lm.infer.load import load_run
  model, params, config, tokenizer = load_run(workdir)
  template = None
  if any(isinstance(e, dict) and 'messages' in e or getattr(e, 'messages', None)
         for e in examples):
    template = instruct.chat_template(config, tokenizer)
  _, results = exact_match.exact_match(model, params, tokenizer, examples, template)
  greedy = np.array([r['correct'] for r in results], np.float64)
  sampled = None
  if _SAMPLES.value:
    sampled = np.mean([[r['correct'] for r in exact_match.exact_match(
        model, params, tokenizer, examples, template, temperature=_TEMPERATURE.value,
        seed=1000 * k)[1]] for k in range(_SAMPLES.value)], axis=0)
  return greedy, sampled, results


def main(argv):
  del argv
  import numpy as np
  from lm.data import finetune_sets, instruct
  from lm.train import checkpoint
  if _DATA.value:
    examples = [r for r in instruct.read_records(_DATA.value)]
  else:
    task = checkpoint.read_config(_WORKDIR.value).task
    examples = finetune_sets.make(task.finetune_examples, task.finetune_eval)[1]
  if _NUM.value:
    examples = examples[:_NUM.value]
  greedy, sampled, results = scores(_WORKDIR.value, examples)
  misses = [r for r in results if not r['correct']][:_SHOW.value]
  out = {'exact_match': float(greedy.mean()), 'examples': len(results), 'misses': misses}
  if sampled is not None:
    out[f'sampled_exact_match@{_TEMPERATURE.value:g}'] = float(sampled.mean())
  if _AGAINST.value:
    other_greedy, other_sampled, _ = scores(_AGAINST.value, examples)
    def paired(a, b):
      d = a - b
      return {'difference': float(d.mean()),
              'standard_error': float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0}
    out['against'] = {'workdir': _AGAINST.value, 'exact_match': float(other_greedy.mean()),
                      'exact_match_difference': paired(greedy, other_greedy)}
    if sampled is not None:
      out['against']['sampled_exact_match'] = float(other_sampled.mean())
      out['against']['sampled_difference'] = paired(sampled, other_sampled)
  print(json.dumps(out))


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
