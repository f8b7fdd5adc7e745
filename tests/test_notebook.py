"""The notebooks run top to bottom at tiny scale."""
import pathlib
import re

import pytest
from conftest import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(name, data_dir, monkeypatch) -> list[dict]:
  """Executes notebooks/NAME tiny; returns its code cells' outputs (none may be an error)."""
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  monkeypatch.setenv('LM_NOTEBOOK_TINY', '1')
  monkeypatch.setenv('LM_NOTEBOOK_DATA_DIR', str(data_dir))
  monkeypatch.setenv('XLA_FLAGS', subprocess_env(devices=1)['XLA_FLAGS'])
  nb = nbformat.read(ROOT / 'notebooks' / name, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(ROOT)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.get('outputs', [])]
  assert not [o for o in outputs if o.get('output_type') == 'error']
  return outputs


def _text(outputs) -> str:
  return ''.join(o.get('text', '') for o in outputs if o.get('output_type') == 'stream')


def test_quickstart_notebook_runs(data_dir, monkeypatch):
  outputs = _run('quickstart.ipynb', data_dir, monkeypatch)
  assert any(o.get('output_type') == 'display_data' and 'image/png' in o.get('data', {})
             for o in outputs)  # the loss curve
  text = _text(outputs)
  assert 'best eval loss' in text and 'def ' in text


def test_t5_notebook_pretrains_and_decodes_with_beams(data_dir, monkeypatch):
  text = _text(_run('t5_span_corruption.ipynb', data_dir, monkeypatch))
  assert 'best eval loss' in text
  lines = {line.split(':')[0]: line for line in text.splitlines() if ':' in line}
  assert '<X0>' in lines['input'] and '<X0>' in lines['truth']  # spans were cut out
  assert 'beams' in lines  # and beam search wrote something back


def test_lora_notebook_finetunes_and_exports_to_peft(data_dir, monkeypatch):
  for module in ('tokenizers', 'torch', 'transformers', 'peft'):  # tiny mode's HF model, PEFT
    pytest.importorskip(module)
  text = _text(_run('lora_finetune.ipynb', data_dir, monkeypatch))
  assert re.search(r'^exact match before: [\d.]+ on 8 held-out', text, re.M)
  assert re.search(r'^exact match after: [\d.]+ on 8 held-out', text, re.M)
  assert re.search(r"^PEFT adapter: .*'q_proj'.*'up_proj'", text, re.M)  # attention and MLP
  for name in ('peft', 'merged'):  # PEFT's adapter on the exported base; the merged export
    diff = re.search(rf'^{name} max logit difference: (\S+)$', text, re.M)
    assert diff and float(diff[1]) < 1e-4, text[-2000:]


def test_interpret_notebook_shows_each_view(data_dir, monkeypatch):
  outputs = _run('interpret.ipynb', data_dir, monkeypatch)
  images = [o for o in outputs if o.get('output_type') == 'display_data'
            and 'image/png' in o.get('data', {})]
  assert len(images) == 3  # attention map, logit lens, attributions
  text = _text(outputs)
  assert re.search(r'^attention maps: \(2, 2, \d+, \d+\)', text, re.M)
  assert re.search(r'^layer 1: ', text, re.M)
  error = re.search(r'completeness error (\S+)$', text, re.M)
  assert error and float(error[1]) < 0.01
