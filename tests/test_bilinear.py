"""MCB and MLB (ucam_jax/models/bilinear.py) at toy sizes: compact bilinear pooling against the
explicit sketched outer product, the staged contract on grid features and on raw images, the
fixed count-sketch tables through training and a checkpoint, the GCA switches on both, and the
1-vs-8-device equality of training on both. Compiling is most of their time: parameters and
training states are initialised in one jitted program each (eager init runs op by op)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import mcb, mlb
from ucam_jax import checkpoints, explain, gca, models, sharding, train
from ucam_jax.datasets import synthetic
from ucam_jax.models import bilinear

GRID = (4, 4, 12)
VOCAB, ANSWERS, LENGTH = 20, 13, 4
SIZES = {'mcb': dict(embed_dim=8, question_dim=16, sketch_dim=64, attention_dim=8),
         'mlb': dict(embed_dim=8, question_dim=16, attention_dim=8, joint_dim=16)}


def tiny_config(name, variant='vqa_v1', **model):
  """configs/<name>.py:<variant> at toy sizes, with few uncertainty samples."""
  config = {'mcb': mcb, 'mlb': mlb}[name].get_config(variant)
  config.model.update(**SIZES[name], **model)
  if mcb.is_raw(variant):
    config.model.update(stem_features=(8, 16), image_dim=12)
  config.ucam.update(aleatoric_samples=8, predictive_samples=3)
  return config


def _batch(inputs, n=4, seed=0, questions_per_image=None):
  batch = synthetic.batch(seed, n, questions_per_image, grid_shape=GRID, num_answers=ANSWERS,
                          vocab_size=VOCAB, max_question_length=LENGTH)
  if inputs == 'image':  # 16 px: a 4x4 grid after the stem's two stride-2 convs.
    batch['image'] = np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), np.uint8)
  return batch


@functools.cache
def _setup(name, inputs='grid'):
  """(model, params, batch), shared by the tests of one model and input kind."""
  model = models.get_model(tiny_config(name, 'vqa_v1' if inputs == 'grid' else 'easy_vqa'),
                           VOCAB, ANSWERS)
  batch = _batch(inputs)
  variables = jax.jit(model.init)(jax.random.key(0), batch['image'], batch['question'],
                                  batch['length'])
  return model, {'params': variables['params']}, batch


def _train_state(config, model, groups):
  return jax.jit(lambda g: train.create_train_state(config, model, 10, g))(groups)


def test_compact_bilinear_is_the_sketched_outer_product():
  """MCB(x, y) = the count sketch of vec(x y^T) under the bucket h_x(i) + h_y(j) mod D and the
  sign s_x(i) s_y(j) (Pham & Pagh 2013), computed here with explicit sums."""
  rng = np.random.default_rng(0)
  dx, dy, dim = 5, 7, 16
  # float32: JAX's default width (float64 inputs would be truncated, with a warning).
  x, y = rng.normal(size=(3, dx)).astype(np.float32), rng.normal(size=(3, dy)).astype(np.float32)
  hx, hy = rng.integers(0, dim, dx), rng.integers(0, dim, dy)
  sx, sy = (rng.choice(np.float32([-1, 1]), d) for d in (dx, dy))
  want = np.zeros((3, dim))
  for n in range(3):
    np.add.at(want[n], (hx[:, None] + hy[None, :]) % dim,
              sx[:, None] * sy[None, :] * np.outer(x[n], y[n]))
  # The count sketch alone is a projection by a {0, +-1} matrix with one entry per row.
  sketch = np.zeros((dx, dim))
  sketch[np.arange(dx), hx] = sx
  np.testing.assert_allclose(bilinear.count_sketch(x, hx, sx, dim), x @ sketch, rtol=1e-5,
                             atol=1e-6)
  layer = bilinear.CompactBilinear(dim)
  params = {'sketch_x': {'sketch_hash': hx.astype(np.float32), 'sketch_sign': sx},
            'sketch_y': {'sketch_hash': hy.astype(np.float32), 'sketch_sign': sy}}
  assert jax.tree.structure(params) == jax.tree.structure(
      layer.init(jax.random.key(0), x, y)['params'])
  got = layer.apply({'params': params}, x, y)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# Each model on one input kind: the stages past encode_image are the same code for both.
@pytest.mark.parametrize('name,inputs', [('mcb', 'grid'), ('mlb', 'image')])
def test_staged_contract(name, inputs):
  """The checks SAN and the attention network pass: shapes, the stages compose to the whole
  model with and without dropout, dropout only in the answer stage, padding ignored, certainty
  renormalises each glimpse, 'grid' and 'words' exposed to the explanation API."""
  model, params, batch = _setup(name, inputs)
  n = len(batch['length'])
  full = model.apply(params, batch['image'], batch['question'], batch['length'])
  assert full['logits'].shape == (n, ANSWERS) and (full['sigma2'] > 0).all()
  assert full['attention'].shape == (n, 2, 4, 4)
  np.testing.assert_allclose(full['attention'].sum((-1, -2)), 1.0, rtol=1e-5)
  v = model.apply(params, batch['image'], method='encode_image')
  assert v.shape == (n, 4, 4, 12)
  if inputs == 'grid':
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, rtol=1e-5)
  e = model.apply(params, batch['question'], method='embed_question')
  q, words = model.apply(params, e, batch['length'], method='encode_question')
  assert q.shape == (n, 16) and words.shape == (n, LENGTH, 16)
  # The encoders take no dropout key: MC samples share them.
  np.testing.assert_array_equal(model.apply(params, e, batch['length'], method='encode_question',
                                            rngs={'dropout': jax.random.key(1)})[0], q)
  staged = model.apply(params, v, q, method='answer')
  for k in ('logits', 'sigma2', 'attention'):
    np.testing.assert_allclose(staged[k], full[k], rtol=1e-5, atol=1e-6)

  def answer(key, deterministic=False):
    return model.apply(params, v, q, method='answer', deterministic=deterministic,
                       rngs={'dropout': key})['logits']
  dropped = answer(jax.random.key(3))
  assert not np.allclose(dropped, answer(jax.random.key(4)))
  np.testing.assert_array_equal(answer(jax.random.key(3), True), answer(jax.random.key(4), True))
  # With dropout on, the full model (the embeddings dropped out too, only when asked) is the
  # 'full' MC scope's sample with the same key.
  key = jax.random.key(3)
  sample = gca.mc_sampler(model.apply, params, (v, e, batch['length']), scope='full')
  np.testing.assert_allclose(sample(key)[0], model.apply(
      params, batch['image'], batch['question'], batch['length'], deterministic=False,
      rngs={'dropout': key})['logits'], rtol=1e-5, atol=1e-6)
  assert not np.allclose(model.apply(params, e, batch['length'], method='encode_question',
                                     deterministic=False, rngs={'dropout': key})[0], q)

  padded = np.where(np.arange(LENGTH) < batch['length'][:, None], batch['question'], 7)
  np.testing.assert_allclose(model.apply(params, batch['image'], padded.astype(np.int32),
                                         batch['length'])['logits'],
                             full['logits'], rtol=1e-5, atol=1e-6)

  certainty = np.random.default_rng(0).uniform(size=(n, 4, 4)).astype(np.float32)
  certainty[1] = 0.0  # All zero: that example keeps its attention.
  got = model.apply(params, v, q, certainty, method='answer')['attention']
  want = np.asarray(full['attention']) * certainty[:, None]
  want[1] = full['attention'][1]
  np.testing.assert_allclose(got, want / want.sum((-1, -2), keepdims=True), rtol=1e-5,
                             atol=1e-7)

  def apply_answer(variables, v, q, **kwargs):
    return model.apply(variables, v, q, method='answer', **kwargs)
  # Jitted: one compile each, where eager gradients dispatch op by op (4 s here).
  maps = jax.jit(lambda params, v, q: explain.explain(
      apply_answer, params, (v, q), 'grid', lambda out: out['logits'].max(-1),
      method='gradcam'))(params, v, q)
  assert maps.shape == (n, 4, 4) and np.isfinite(maps).all()
  activation, _ = jax.jit(lambda params, e, lengths: explain.activations_and_gradients(
      functools.partial(model.apply, method='encode_question'), params, (e, lengths), 'words',
      lambda out: out[0].sum(-1)))(params, e, batch['length'])
  np.testing.assert_allclose(activation, e, rtol=1e-6)


def _tables(params):
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat
          if str(p[-1].key) in models.FIXED_PARAMS}


def test_count_sketch_tables_are_fixed_through_training_and_a_checkpoint(tmp_path):
  config = tiny_config('mcb')
  config.ucam.variance_optimizer = 'sgd'  # The multi_transform optimiser, chained.
  config.ucam.mode = 'none'  # The quickest step to compile; the tables get no gradient in any.
  model = models.get_model(config, VOCAB, ANSWERS)
  groups = _batch('grid', 2, seed=1, questions_per_image=3)
  state = _train_state(config, model, groups)
  tables = _tables(state.params)
  assert len(tables) == 8  # Two MCB layers, each a sketch of x and of y: hash and sign.
  for key, table in tables.items():
    if key.endswith("'sketch_hash']"):
      assert (table == np.round(table)).all() and table.min() >= 0 and table.max() < 64
    else:
      assert set(np.unique(table)) <= {-1.0, 1.0}
  again = _tables(_train_state(config, model, groups).params)
  config.seed = 1
  other = _tables(_train_state(config, model, groups).params)
  for key in tables:  # Fixed by the seed.
    np.testing.assert_array_equal(again[key], tables[key])
  assert any((other[key] != tables[key]).any() for key in tables)

  step = jax.jit(functools.partial(train.train_step, ucam=config.ucam))
  new = state
  for _ in range(2):
    new, metrics = step(new, groups)
  assert np.isfinite(metrics['loss'])
  for key, table in _tables(new.params).items():
    np.testing.assert_array_equal(table, tables[key])
  assert not np.allclose(new.params['params']['attention_proj']['kernel'],
                         state.params['params']['attention_proj']['kernel'])

  manager = checkpoints.manager(str(tmp_path))
  checkpoints.save(manager, 2, new)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, new)
  restored = checkpoints.restore_verified(manager, 2, abstract)
  for key, table in _tables(restored.params).items():
    np.testing.assert_array_equal(table, tables[key])


# Every value of mode (mask, loss_only), uncertainty and branch, on each model.
SWITCHES = [
    dict(mode='loss_only', uncertainty='both'),
    dict(mode='mask', uncertainty='aleatoric', branch='image', combine='multiply'),
    dict(mode='mask', uncertainty='predictive', branch='question', combine='residual',
         mc_scope='full'),
    dict(mode='mask', uncertainty='both', branch='both', combine='multiply'),
]


@pytest.mark.parametrize('switches', SWITCHES, ids=lambda s: '-'.join(s.values()))
@pytest.mark.parametrize('name', ['mcb', 'mlb'])
def test_gca_switches_give_finite_terms_and_gradients(name, switches):
  model, params, batch = _setup(name)
  ucam = tiny_config(name).ucam
  ucam.update(switches)
  v = model.apply(params, batch['image'], method='encode_image')
  e = model.apply(params, batch['question'], method='embed_question')
  weights = np.array([1.0, 1.0, 1.0, 0.0])

  def loss(params):
    terms, out = gca.forward(model.apply, params, (v, e, batch['length']), batch['answer'],
                             weights, jax.random.key(0), ucam, train=True)
    return terms['loss'], (terms, out)

  (_, (terms, out)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves((terms, grads)))
  np.testing.assert_allclose(terms['loss'], terms['answer'] + terms['uncertainty'], rtol=1e-6)
  if ucam.mode == 'mask':
    branches = {'image', 'question'} if ucam.branch == 'both' else {ucam.branch}
    assert {k for k in out if k.startswith('certainty_')} == {f'certainty_{b}' for b in branches}
  fixed = jax.tree.leaves(models.fixed_mask(grads))
  assert any(np.abs(g).max() > 0 for g, f in zip(jax.tree.leaves(grads), fixed) if not f)
  assert not any(np.abs(g).any() for g, f in zip(jax.tree.leaves(grads), fixed) if f)


@pytest.mark.parametrize('name', ['mcb', 'mlb'])
def test_eight_devices_match_one_device(name):
  """Two training steps on 8 images of 3 questions (some padding), data parallel over 8
  devices, equal the same steps on one device."""
  assert jax.device_count() == 8, 'conftest asks XLA for 8 CPU devices'
  config = tiny_config(name)
  config.ucam.mode = 'none'  # The GCA modes: test_gca_switches_...; here, the sharding.
  # MCB's signed square root (slope 1 / (2 sqrt|z|) near 0) amplifies round-off, and Adam turns
  # the gradient noise of near-zero gradients into whole steps: in float32 its losses were 1e-4
  # apart at step 3 and a parameter 2e-3 (the first gradients 4e-5 apart, relative); in float64,
  # 3e-10. So it runs in float64, where a sharding error would still show.
  x64 = name == 'mcb'
  if x64:
    config.model.dtype = 'float64'
  model = models.get_model(config, VOCAB, ANSWERS)
  batches = [_batch('grid', 8, seed=i, questions_per_image=3) for i in range(2)]
  for batch in batches:
    batch['weight'][::2, -1] = 0.0  # Padding questions.
  results = []
  with jax.enable_x64(x64):
    start = _train_state(config, model, batches[0])
    if x64:  # The optimiser's state too, so that the second step reuses the first's program.
      start = jax.tree.map(
          lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, start)
    for devices in (jax.devices()[:1], jax.devices()):
      mesh = sharding.make_mesh(devices)
      state = jax.device_put(start, sharding.replicated(mesh))
      step = jax.jit(functools.partial(train.train_step, ucam=config.ucam))
      losses = []
      for batch in batches:
        state, metrics = step(state, sharding.shard_batch(batch, mesh))
        losses.append(float(metrics['loss']))
      assert (len(state.params['params']['classifier']['kernel'].sharding.device_set)
              == len(devices))
      results.append((np.array(losses), jax.device_get(state.params)))
  (loss_1, params_1), (loss_8, params_8) = results
  # Same maths, different reduction order across devices: round-off only.
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               params_8, params_1)
