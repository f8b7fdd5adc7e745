"""The quickstart notebook runs top to bottom at tiny scale."""
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_notebook_runs(data_dir, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  monkeypatch.setenv('LM_NOTEBOOK_TINY', '1')
  monkeypatch.setenv('LM_NOTEBOOK_DATA_DIR', str(data_dir))
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=1')
  nb = nbformat.read(ROOT / 'notebooks' / 'quickstart.ipynb', as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(ROOT)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == 'code' for o in cell.get('outputs', [])]
  assert not [o for o in outputs if o.get('output_type') == 'error']
  assert any(o.get('output_type') == 'display_data' and 'image/png' in o.get('data', {})
             for o in outputs)  # the loss curve
  text = ''.join(o.get('text', '') for o in outputs if o.get('output_type') == 'stream')
  assert 'best eval loss' in text and 'def ' in text
