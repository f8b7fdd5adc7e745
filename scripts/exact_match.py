"""Exact match of greedy generation on held-out instruction examples; one JSON line.

  python scripts/exact_match.py --workdir=runs/NAME [--data=eval.jsonl] [--num=200]

workdir: any run (a pre-trained base, a full fine-tune, an adapter run: its base comes
from its config.init_from). data: JSON lines of {"prompt", "completion"} or
{"messages": [...]}; default: the embedded fine-tuning set's held-out examples
(lm/data/finetune_sets.py, task.finetune_eval of them). Prints accuracy, a few misses.
"""
import json

from absl import app, flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory.')
_DATA = flags.DEFINE_string('data', '', 'Instruction JSON lines ("": the embedded held-out set).')
_NUM = flags.DEFINE_integer('num', 0, 'Examples to score (0: all).')
_SHOW = flags.DEFINE_integer('show', 3, 'Misses to print.')


def main(argv):
  del argv
  from lm.data import finetune_sets, instruct
  from lm.eval import exact_match
  from lm.infer.load import load_run
  model, params, config, tokenizer = load_run(_WORKDIR.value)
  if _DATA.value:
    examples = [r for r in instruct.read_records(_DATA.value)]
  else:
    examples = finetune_sets.make(config.task.finetune_examples, config.task.finetune_eval)[1]
  if _NUM.value:
    examples = examples[:_NUM.value]
  template = None
  if any(isinstance(e, dict) and 'messages' in e or getattr(e, 'messages', None)
         for e in examples):
    template = instruct.chat_template(config, tokenizer)
  accuracy, results = exact_match.exact_match(model, params, tokenizer, examples, template)
  misses = [r for r in results if not r['correct']][:_SHOW.value]
  print(json.dumps({'exact_match': accuracy, 'examples': len(results), 'misses': misses}))


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
