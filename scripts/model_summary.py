"""Prints a per-module parameter table; the last line is `total_params=N`.

  python scripts/model_summary.py --config=configs/gpt2_124m.py

Shapes only (jax.eval_shape): nothing is allocated, so a 13B config takes seconds.
"""
from absl import app
from ml_collections import config_flags

from lm import models
from lm import config as lm_config

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_DEPTH = 3


def main(argv):
  del argv
  config = lm_config.resolve(_CONFIG.value)
  model = models.get_model(config.model, config.runtime)  # shapes only: no kernels built
  table = models.param_table(model)
  width = max(len(path) for path, _, _ in table)
  groups: dict[str, int] = {}
  for path, shape, n in table:
    print(f'{path:<{width}}  {str(shape):<22} {n:>15,}')
    key = '/'.join(path.split('/')[:2 if path.startswith('layers') else 1])
    groups[key] = groups.get(key, 0) + n
  print('\nper module:')
  for key, n in groups.items():
    print(f'  {key:<{width}} {n:>15,}')
  print(f'total_params={sum(n for _, _, n in table)}')


if __name__ == '__main__':
  app.run(main)
