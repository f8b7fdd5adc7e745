"""Samples from a trained (or imported) run directory (CLI contract: docs/architecture.md).

  python scripts/sample.py --workdir=DIR --prompt="ROMEO:" [--max_new_tokens=N \
      --temperature=T --top_k=K --top_p=P --seed=S]

Several prompts: repeat --prompt. Greedy: --temperature=0.
"""
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory written by train.py.')
_PROMPT = flags.DEFINE_multi_string('prompt', [''], 'Prompt text (repeat for a batch).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate per prompt.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, '0 means greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Keep the k most likely tokens (0: all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass (1: off).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_STEP = flags.DEFINE_integer('step', -1, 'Checkpoint step (-1: the newest).')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  from lm.infer import sampling
  from lm.infer.load import load_run
  try:
    model, params, _, tokenizer = load_run(
        _WORKDIR.value, step=None if _STEP.value < 0 else _STEP.value)
  except FileNotFoundError as e:
    sys.exit(str(e))
  for prompt in _PROMPT.value:
    try:
      text = sampling.sample_text(model, params, tokenizer, prompt,
                                  max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                                  top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value)
    except ValueError as e:
      sys.exit(str(e))
    print(text)
    if len(_PROMPT.value) > 1:
      print('-' * 40)


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
