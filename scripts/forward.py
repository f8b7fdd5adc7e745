"""The float32 logits of one sequence under a run's model, saved as a .npy array.

  python scripts/forward.py --workdir=DIR --ids=1,2,3 --out=FILE.npy
  python scripts/forward.py --workdir=DIR --ids=1,2,3 --decoder_ids=0,5,6 --out=FILE.npy

Writes an array [positions, vocab]: a decoder's LM head over --ids; an encoder's MLM
head over --ids; an encoder-decoder's decoder over --decoder_ids (which start with the
decoder's start token, T5: 0) with --ids as the encoder's input. No padding, no mask:
every id is attended.
"""
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (train.py, convert_checkpoint.py).')
_IDS = flags.DEFINE_string('ids', None, 'Comma-separated token ids (an encoder-decoder: its '
                           'encoder input).')
_DECODER_IDS = flags.DEFINE_string('decoder_ids', None, 'Comma-separated decoder input ids '
                                   '(an encoder-decoder only).')
_OUT = flags.DEFINE_string('out', None, 'Where to write the logits (.npy).')
_STEP = flags.DEFINE_integer('step', -1, 'Checkpoint step (-1: the newest).')


def _parse(name, value) -> list[int]:
  try:
    ids = [int(x) for x in value.replace(' ', '').split(',') if x]
  except ValueError:
    sys.exit(f'--{name} must be comma-separated integers, got {value!r}.')
  if not ids:
    sys.exit(f'--{name} is empty.')
  return ids


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  ids = _parse('ids', _IDS.value)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lm.infer.load import load_run
  try:
    model, params, config, _ = load_run(_WORKDIR.value,
                                        step=None if _STEP.value < 0 else _STEP.value)
  except FileNotFoundError as e:
    sys.exit(f'error: {e}')
  family = config.model.get('family', 'decoder')
  if (family == 'encdec') != (_DECODER_IDS.value is not None):
    sys.exit('--decoder_ids is required for an encoder-decoder (e.g. --decoder_ids=0,5,6, '
             'starting with its decoder_start_id) and only for one.')
  tokens = jnp.asarray([ids], jnp.int32)
  if family == 'encdec':
    decoder = jnp.asarray([_parse('decoder_ids', _DECODER_IDS.value)], jnp.int32)
    forward = lambda p: model.apply({'params': p}, tokens, decoder)
  elif family == 'encoder':
    forward = lambda p: model.apply({'params': p}, tokens, head='mlm')
  else:
    forward = lambda p: model.apply({'params': p}, tokens)
  try:
    logits = jax.jit(forward)(params)  # jitted: op by op is seconds slower on CPU
  except ValueError as e:  # e.g. an encoder without an MLM head
    sys.exit(f'error: {e}')
  np.save(_OUT.value, np.asarray(logits[0], np.float32))


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir', 'ids', 'out'])
  app.run(main)
