"""The frozen extractor of the synthetic datasets (ucam_jax/pretrain_features.py): deterministic
by seed, its store's format and L2 norm, resuming, and a run of the published model reading it."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from ucam_jax import ablation, input_pipeline, pretrain_features, train
from ucam_jax.datasets import grid_store


def tiny_config(data_dir) -> ml_collections.ConfigDict:
  """configs/grounded_shapes_grid.py at the paper_smoke preset's toy size."""
  spec = ablation.PAPER_PRESETS['paper_smoke']
  config = ablation.paper_run_config(spec, str(data_dir))(spec['test'], dict(mode='none'), 0)
  return config


def test_extractor_is_deterministic_by_seed():
  extractor = tiny_config(None).extractor
  a, b = (pretrain_features.train_extractor(extractor) for _ in range(2))
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
  other = ml_collections.ConfigDict({**extractor.to_dict(), 'train_seed': 1})
  c = pretrain_features.train_extractor(other)
  assert not jax.tree.all(jax.tree.map(np.array_equal, a, c))
  assert pretrain_features.extractor_id(extractor) != pretrain_features.extractor_id(other)
  # The pretraining draw is its own dataset seed's: targets are each class's share of a cell.
  images, targets = pretrain_features.pretraining_draw(extractor)
  assert images.shape == (8, 32, 32, 3) and targets.shape == (8, 4, 4, 16)
  np.testing.assert_allclose(targets.sum(-1), 1, atol=1e-6)
  assert extractor.seed == 100


def test_store_format_l2_norm_resume_and_reuse(tmp_path, monkeypatch):
  config = tiny_config(tmp_path)
  builder = input_pipeline.get_builder(config)
  table = input_pipeline.question_table(builder, 'test')
  store = pretrain_features.open_store(builder, 'test', config, table.image_id)
  assert store.grid_shape == (4, 4, 8) and store.image_ids == sorted(set(table.image_id))
  assert store.meta['extractor_id'] == pretrain_features.extractor_id(config.extractor)
  assert store.meta['l2_normalised']
  grids = np.stack([store[i] for i in store.image_ids]).astype(np.float32)
  norms = np.linalg.norm(grids, axis=-1)
  assert np.all((np.abs(norms - 1) < 2e-3) | (norms == 0)) and (norms > 0).mean() > 0.5
  # The same grids as the extractor computes on the stored images.
  params = pretrain_features.load_or_train_extractor(config)
  images = np.stack([builder.as_data_source('test')[r]['image'] for r in
                     [list(table.image_id).index(i) for i in store.image_ids]])
  np.testing.assert_allclose(pretrain_features.grid_features(params, images, config.extractor),
                             grids, atol=2e-3)

  # Interrupted after its first batch: a rerun resumes from it, and the extractor is reused.
  path = store.path
  os.rename(path, str(tmp_path / 'done'))
  calls = []
  real = pretrain_features.grid_features

  def fails_second_time(*args):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(*args)
  monkeypatch.setattr(pretrain_features, 'grid_features', fails_second_time)
  with pytest.raises(KeyboardInterrupt):
    pretrain_features.write_store(builder, 'test', config, batch_size=2)
  with open(os.path.join(grid_store.partial_path(path), grid_store.PROGRESS)) as f:
    assert json.load(f)['done'] == 2
  monkeypatch.setattr(pretrain_features, 'train_extractor', lambda *_: pytest.fail('retrained'))
  monkeypatch.setattr(pretrain_features, 'grid_features', real)
  pretrain_features.write_store(builder, 'test', config, batch_size=2)
  resumed = grid_store.GridStore(path)
  np.testing.assert_array_equal(np.stack([resumed[i] for i in resumed.image_ids]),
                                grids.astype(np.float16))
  # A finished store is read, not written again.
  monkeypatch.setattr(pretrain_features, 'grid_features', lambda *_: pytest.fail('rewritten'))
  assert pretrain_features.open_store(builder, 'test', config).path == path


def test_attention_net_trains_on_the_store_and_maps_are_scored_on_its_grid(tmp_path):
  config = tiny_config(tmp_path / 'data')
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  test = results['test']
  assert test['map_grid'] == [4, 4]  # The 32 px masks pooled to the 4x4 cells.
  assert -1 <= test['maps']['model_attention']['spearman'] <= 1
  assert 0 <= test['maps']['model_attention']['pointing_game'] <= 1
  assert os.path.exists(tmp_path / 'run' / 'report' / 'index.html')
