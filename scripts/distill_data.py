"""Sequence-level distillation data: a teacher's greedy continuations as JSON lines.

  python scripts/distill_data.py --teacher=runs/teacher6 --out=teacher.jsonl \
      [--num=2000 --prompt_tokens=32 --new_tokens=96]
  python scripts/train.py --config=configs/distill_quick.py --workdir=runs/seq_student \
      --config.task.name=causal_lm --config.data.dataset=text_files \
      --config.data.path=teacher.jsonl

Prompts are the first prompt_tokens tokens of the teacher's own training documents; each
line is {"text": prompt + continuation} (lm/train/distill.py: teacher_texts). The student
then trains on the teacher's outputs instead of (or, with task distill, besides) the data.
"""
import json
import sys

from absl import app, flags, logging

_TEACHER = flags.DEFINE_string('teacher', None, 'The teacher run directory.')
_OUT = flags.DEFINE_string('out', None, 'JSON lines file to write.')
_NUM = flags.DEFINE_integer('num', 2000, 'Documents to continue.')
_PROMPT = flags.DEFINE_integer('prompt_tokens', 32, 'Tokens of each document as the prompt.')
_NEW = flags.DEFINE_integer('new_tokens', 96, 'Greedy tokens the teacher adds.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Prompts decoded at once.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from lm.train import distill
  try:
    texts = distill.teacher_texts(_TEACHER.value, _NUM.value, _PROMPT.value, _NEW.value,
                                  _BATCH.value)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  with open(_OUT.value, 'w') as f:
    for t in texts:
      f.write(json.dumps({'text': t}) + '\n')
  print(json.dumps({'lines': len(texts), 'out': _OUT.value}))


if __name__ == '__main__':
  flags.mark_flags_as_required(['teacher', 'out'])
  app.run(main)
