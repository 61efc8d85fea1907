"""notebooks/ucam_jax.ipynb runs end to end on a tiny budget: a cell after its parameters cell
overrides them (as papermill would), and any failing cell fails the test."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / 'notebooks' / 'ucam_jax.ipynb'

TINY = {'batch_size': 8, 'eval_batch_size': 512, 'log_every_steps': 5,
        'checkpoint_every_steps': 10, 'mc_samples': 2, 'faithfulness_questions': 8,
        'faithfulness_steps': 4, 'report_questions': 4,
        'model': {'stem_features': (8, 16), 'embed_dim': 16, 'hidden_dim': 32,
                  'attention_dim': 16, 'classifier_dim': 32}}


def test_the_notebook_runs_end_to_end(small_data_dir, tmp_path):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  parameters = next(i for i, cell in enumerate(notebook.cells)
                    if 'parameters' in cell.metadata.get('tags', []))
  notebook.cells.insert(parameters + 1, nbformat.v4.new_code_cell(
      f'WORKDIR = {str(tmp_path / "run")!r}\nDATA_DIR = {small_data_dir!r}\n'
      f'NUM_TRAIN_STEPS = 20\nOVERRIDES = {TINY!r}'))
  # The kernel starts in the repository, so `configs` and (in a checkout) `ucam_jax` import.
  NotebookClient(notebook, timeout=300, kernel_name='python3',
                 resources={'metadata': {'path': str(REPO)}}).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
  figures = [o for o in outputs if 'image/png' in o.get('data', {})]
  # The curves, 4 test questions, 3 questions about the drawn image.
  assert len(figures) == 8, [o.get('data', {}).keys() for o in outputs]
  assert (tmp_path / 'run' / 'metrics.json').exists()
