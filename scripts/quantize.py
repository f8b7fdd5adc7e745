"""Post-training weight quantization of a run: writes a new run directory.

  python scripts/quantize.py --workdir=DIR --out=DIR2 --method=int8|int4|nf4 \
      [--group_size=128 --asymmetric --targets=REGEX --activations=int8]

DIR2 holds the quantized params alone (codes + scales: lm/compress/quantize.py), the config
(quant.* set) and the tokenizer; sample.py, score.py, evaluate.py and serve.py load it as any
run. A LoRA run is merged first. --method=none writes the float params alone (a baseline for
sizes). Prints one JSON line: params bytes before and after, the checkpoint's size on disk,
the quantized kernels.
"""
import json
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string('workdir', None, 'The float run to quantize.')
_OUT = flags.DEFINE_string('out', None, 'New run directory (must not exist or be empty).')
_METHOD = flags.DEFINE_enum('method', 'int8', ['none', 'int8', 'int4', 'nf4'], 'Format.')
_GROUP = flags.DEFINE_integer('group_size', 128, 'int4: inputs sharing a scale.')
_ASYM = flags.DEFINE_bool('asymmetric', False, 'int8/int4: a zero point beside the scale.')
_TARGETS = flags.DEFINE_string('targets', '', 'Regex over Linear module paths ("": all).')
_ACTIVATIONS = flags.DEFINE_enum('activations', 'none', ['none', 'int8'],
                                 'int8: w8a8 (int8 weights): per-token int8 inputs, int8 matmuls.')
_STEP = flags.DEFINE_integer('step', -1, 'Checkpoint step (-1: the newest).')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from lm.compress import quantize
  try:
    report = quantize.quantize_run(
        _WORKDIR.value, _OUT.value, _METHOD.value, group_size=_GROUP.value,
        asymmetric=_ASYM.value, targets=_TARGETS.value, activations=_ACTIVATIONS.value,
        step=None if _STEP.value < 0 else _STEP.value)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  print(json.dumps(report))


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(main)
