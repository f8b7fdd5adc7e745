"""Per-token log-probabilities of a text (or of token ids) under a run's model.

  python scripts/score.py --workdir=DIR --text="..."   [--add_bos / --noadd_bos]
  python scripts/score.py --workdir=DIR --ids=1,2,3

Prints one JSON object: token_ids, token_logprobs (log p(token | the tokens before
it); null for the first token, which has no context) and total_logprob (their sum).
Text gets BOS (and EOS) as the run's tokenizer config says unless told otherwise.
"""
import json
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (train.py, convert_checkpoint.py).')
_TEXT = flags.DEFINE_string('text', None, 'Text to score.')
_IDS = flags.DEFINE_string('ids', None, 'Comma-separated token ids to score (instead of --text).')
_ADD_BOS = flags.DEFINE_bool('add_bos', None, 'Prepend BOS to --text (default: as the '
                             'tokenizer config says; no for lm tokenizers).')
_ADD_EOS = flags.DEFINE_bool('add_eos', None, 'Append EOS to --text (default: as above).')
_STEP = flags.DEFINE_integer('step', -1, 'Checkpoint step (-1: the newest).')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if (_TEXT.value is None) == (_IDS.value is None):
    sys.exit('Pass exactly one of --text="..." or --ids=1,2,3.')
  if _IDS.value is not None:
    try:
      ids = [int(x) for x in _IDS.value.replace(' ', '').split(',') if x]
    except ValueError:
      sys.exit(f'--ids must be comma-separated integers, got {_IDS.value!r}.')
  from lm.eval import scoring
  from lm.infer.load import load_run
  try:
    model, params, _, tokenizer = load_run(
        _WORKDIR.value, step=None if _STEP.value < 0 else _STEP.value)
    if _TEXT.value is not None:
      add_bos = _ADD_BOS.value
      add_eos = _ADD_EOS.value
      add_bos = getattr(tokenizer, 'default_add_bos', False) if add_bos is None else add_bos
      add_eos = getattr(tokenizer, 'default_add_eos', False) if add_eos is None else add_eos
      ids = tokenizer.encode(_TEXT.value, add_bos=add_bos, add_eos=add_eos)
    result = scoring.score(model, params, [ids])[0]
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
