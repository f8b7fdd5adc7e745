"""One-shot magnitude pruning of a run: writes a new run directory (float params with zeros).

  python scripts/prune.py --workdir=DIR --out=DIR2 [--sparsity=0.5 --pattern=unstructured|2:4
      --scope=global|layer --targets=REGEX]

DIR2 loads everywhere a run does and exports to Hugging Face as dense weights with zeros.
Prints one JSON line: the sparsity of each pruned kernel and in total. Pruning while
fine-tuning (gradual, masks kept through AdamW and resume): config.prune (lm/compress/prune.py).
"""
import json
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run to prune.')
_OUT = flags.DEFINE_string('out', None, 'New run directory (must not exist or be empty).')
_SPARSITY = flags.DEFINE_float('sparsity', 0.5, 'Share of zeros (unstructured).')
_PATTERN = flags.DEFINE_string('pattern', 'unstructured', 'unstructured or N:M (e.g. 2:4).')
_SCOPE = flags.DEFINE_enum('scope', 'global', ['global', 'layer'], 'One threshold or one a kernel.')
_TARGETS = flags.DEFINE_string('targets', r'(attn|mlp)/[^/]+/kernel$', 'Regex over param paths.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from lm.compress import prune
  try:
    report = prune.prune_run(_WORKDIR.value, _OUT.value, sparsity=_SPARSITY.value,
                             pattern=_PATTERN.value, scope=_SCOPE.value, targets=_TARGETS.value)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  print(json.dumps(report))


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(main)
