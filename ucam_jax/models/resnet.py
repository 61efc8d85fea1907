"""ResNet v1.5 (He et al. 2016, as torchvision builds it) as an image-grid feature extractor.

`ResNet()(images)` returns the last conv stage's grid, [n, H/32, W/32, 32 * width]: ResNet-152 at
448 px gives the published 14x14x2048 (SPEC section 3). BatchNorm always uses its running
statistics: the network is only ever applied with fixed ImageNet weights.

Weights come from a local file, never from the network. The ImageNet weights everyone uses are
torchvision's; convert them once (torch is needed for that step only, not by this package):

  import torch, torchvision                      # or: state_dict = torch.load('resnet152.pth')
  state_dict = torchvision.models.resnet152(weights='IMAGENET1K_V1').state_dict()
  variables = resnet.convert_torchvision_state_dict({k: v.numpy() for k, v in state_dict.items()})
  resnet.save_variables('resnet152_imagenet.npz', variables)

and pass the .npz to `python -m ucam_jax.extract_features --weights=...` (docs/grid_features.md).
The file holds the architecture too: `load_resnet` rebuilds the model from the names and shapes.
"""

import functools
import re
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

STAGE_SIZES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
EXPANSION = 4  # A bottleneck block outputs 4x the width of its 3x3 conv.
# torchvision's preprocessing: RGB in [0, 1], then per channel (x - mean) / std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_EPSILON = 1e-5  # torch.nn.BatchNorm2d's default
# Explicit symmetric paddings as in torchvision: flax's 'SAME' pads stride-2 convs asymmetrically
# (e.g. (2, 3) for 7x7), which would shift every cell by a pixel against the torch weights.
PAD1 = ((1, 1), (1, 1))
PAD3 = ((3, 3), (3, 3))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (carries the stride: v1.5) -> 1x1 (EXPANSION * width), plus the shortcut."""
  width: int
  strides: int = 1
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x):
    """x: [n, h, w, c] -> [n, h / strides, w / strides, EXPANSION * width]."""
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=BN_EPSILON,
                             dtype=self.dtype)
    out = EXPANSION * self.width
    y = nn.relu(norm(name='bn1')(conv(self.width, (1, 1), name='conv1')(x)))
    y = conv(self.width, (3, 3), self.strides, padding=PAD1, name='conv2')(y)
    y = nn.relu(norm(name='bn2')(y))
    y = norm(name='bn3')(conv(out, (1, 1), name='conv3')(y))
    if self.strides != 1 or x.shape[-1] != out:  # torchvision's condition for `downsample`
      x = conv(out, (1, 1), self.strides, name='downsample_conv')(x)
      x = norm(name='downsample_bn')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet v1.5. Submodule names mirror torchvision's: conv1, bn1, layer{k}_{i} (k = 1..4).

  stage_sizes: blocks per stage (STAGE_SIZES[152] by default); width: of the first stage's 3x3
  convs (64 in the published nets; small in tests); num_classes: None returns the grid, a number
  adds torchvision's average pool + fc and returns the logits (e.g. to check converted weights
  on ImageNet images). Variables with an 'fc' entry also work with num_classes=None (unused).
  """
  stage_sizes: Sequence[int] = STAGE_SIZES[152]
  width: int = 64
  num_classes: int | None = None
  dtype: str = 'float32'  # Computation; parameters are float32.

  @nn.compact
  def __call__(self, images):
    """images: [n, H, W, 3] RGB, uint8 or float in [0, 255].

    Returns the grid [n, H/32, W/32, EXPANSION * width * 8] (rounded up for odd sizes), in
    `dtype`; or [n, num_classes] float32 logits when num_classes is set.
    """
    mean = jnp.asarray(IMAGENET_MEAN) * 255.0
    std = jnp.asarray(IMAGENET_STD) * 255.0
    x = ((images.astype(jnp.float32) - mean) / std).astype(self.dtype)
    x = nn.Conv(self.width, (7, 7), 2, padding=PAD3, use_bias=False, dtype=self.dtype,
                name='conv1')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, dtype=self.dtype,
                     name='bn1')(x)
    # Padding with -inf (reduce_window's identity) as torch's MaxPool2d(3, 2, padding=1).
    x = nn.max_pool(nn.relu(x), (3, 3), (2, 2), padding=PAD1)
    for k, num_blocks in enumerate(self.stage_sizes):
      for i in range(num_blocks):
        x = Bottleneck(self.width * 2 ** k, strides=2 if k > 0 and i == 0 else 1,
                       dtype=self.dtype, name=f'layer{k + 1}_{i}')(x)
    if self.num_classes is None:
      return x
    return nn.Dense(self.num_classes, name='fc')(x.astype(jnp.float32).mean(axis=(1, 2)))


def grid_shape(model: ResNet, image_size: int) -> tuple[int, int, int]:
  """(h, w, c) of the grid of [image_size, image_size] images, without computing anything."""
  extractor = model.clone(num_classes=None)
  out, _ = jax.eval_shape(lambda x: extractor.init_with_output(jax.random.key(0), x),
                          jnp.zeros((1, image_size, image_size, 3), jnp.uint8))
  return tuple(out.shape[1:])


# ------------------------------------------------------------- variables and their files


def _expected_shapes(model: ResNet) -> dict[tuple[str, ...], tuple[int, ...]]:
  """(collection, module, ..., leaf) -> shape of every variable of `model`."""
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))
  return {tuple(k.key for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}


def architecture(flat_names) -> dict:
  """The ResNet kwargs (stage_sizes, width, num_classes) that variables with these names and
  shapes were made for. flat_names: {(collection, module, ..., leaf): shape}."""
  blocks = {}
  for path in flat_names:
    match = re.fullmatch(r'layer(\d)_(\d+)', path[1]) if len(path) > 1 else None
    if match:
      k, i = int(match[1]), int(match[2])
      blocks[k] = max(blocks.get(k, 0), i + 1)
  stage_sizes = tuple(blocks.get(k, 0) for k in range(1, 5))
  conv1 = flat_names.get(('params', 'conv1', 'kernel'))
  if conv1 is None or 0 in stage_sizes:
    raise ValueError('These are not ResNet weights: expected params/conv1/kernel and blocks '
                     f'layer1_0 .. layer4_0; found stages {stage_sizes} '
                     f'(names like {sorted("/".join(p) for p in flat_names)[:5]}).')
  fc = flat_names.get(('params', 'fc', 'kernel'))
  return dict(stage_sizes=stage_sizes, width=int(conv1[-1]),
              num_classes=None if fc is None else int(fc[-1]))


def _check(expected: Mapping, found: Mapping, name, what: str) -> None:
  """One error listing every missing, unexpected and misshapen entry, named by `name(key)`."""
  problems = [f'  missing: {name(k)} (shape {expected[k]})' for k in expected if k not in found]
  problems += [f'  unexpected: {name(k)}' for k in found if k not in expected]
  problems += [f'  misshapen: {name(k)} has shape {found[k]}, expected {expected[k]}'
               for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
  if problems:
    raise ValueError(f'{what} do not fit the ResNet they name ({len(problems)} problem(s)):\n'
                     + '\n'.join(problems))


def check_variables(model: ResNet, variables) -> None:
  """Raises a ValueError naming each variable of `model` that is missing or misshapen."""
  found = {tuple(k.key for k in path): tuple(np.shape(leaf))
           for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}
  _check(_expected_shapes(model), found, '/'.join, 'The variables')


def _unflatten(flat: Mapping[tuple[str, ...], np.ndarray]) -> dict:
  out = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def save_variables(path: str, variables) -> None:
  """Writes variables as an .npz of float32 arrays named 'params/layer1_0/conv1/kernel' etc."""
  flat = {'/'.join(k.key for k in p): np.asarray(v, np.float32)
          for p, v in jax.tree_util.tree_leaves_with_path(variables)}
  with open(path, 'wb') as f:  # np.savez would append '.npz' to other names.
    np.savez(f, **flat)


def load_resnet(path: str, **kwargs) -> tuple[ResNet, dict]:
  """The ResNet a `save_variables` file was written for, and its variables (numpy).

  The architecture comes from the names and shapes; kwargs override ResNet fields (e.g.
  dtype='bfloat16', num_classes=None to drop the classifier). Raises a ValueError naming every
  missing or misshapen array.
  """
  with np.load(path) as data:
    flat = {tuple(name.split('/')): data[name] for name in data.files}
  model = ResNet(**{**architecture({k: v.shape for k, v in flat.items()}), **kwargs})
  if model.num_classes is None:
    flat = {k: v for k, v in flat.items() if k[1] != 'fc'}
  variables = _unflatten(flat)
  try:
    check_variables(model, variables)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from None
  return model, variables


# ------------------------------------------------------------------- torchvision weights


def _torchvision_name(path: tuple[str, ...]) -> str:
  """('params', 'layer2_0', 'downsample_conv', 'kernel') -> 'layer2.0.downsample.0.weight'."""
  collection, *modules, leaf = path
  module = '.'.join(modules)
  module = re.sub(r'layer(\d)_(\d+)', r'layer\1.\2', module)
  module = module.replace('downsample_conv', 'downsample.0').replace('downsample_bn',
                                                                     'downsample.1')
  leaf = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
          ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
          ('batch_stats', 'var'): 'running_var'}[collection, leaf]
  return f'{module}.{leaf}'


def _to_flax(array: np.ndarray) -> np.ndarray:
  """Conv kernels OIHW -> HWIO; the fc weight [out, in] -> [in, out]; the rest as they are."""
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  return array.T if array.ndim == 2 else array


def _from_flax_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape[::-1]


def convert_torchvision_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
  """torchvision ResNet-50/101/152 weights -> {'params': ..., 'batch_stats': ...} for `ResNet`.

  state_dict: torchvision's names ('conv1.weight', 'bn1.running_mean',
  'layer3.5.conv2.weight', 'layer1.0.downsample.1.bias', 'fc.weight', ...) to numpy arrays, i.e.
  `{k: v.numpy() for k, v in torch_state_dict.items()}`; 'num_batches_tracked' is ignored and
  'fc.*' is optional. The architecture (blocks per stage, width, classes) is read from the names
  and shapes. Conv kernels are transposed OIHW -> HWIO and fc.weight [out, in] -> [in, out];
  BatchNorm weight / bias / running_mean / running_var become scale / bias / mean / var.
  Raises one ValueError naming every missing, unexpected or misshapen torchvision key.
  """
  arrays = {k: np.asarray(v) for k, v in state_dict.items()
            if not k.endswith('num_batches_tracked')}
  names = {}
  for name, array in arrays.items():
    match = re.fullmatch(r'layer(\d)\.(\d+)\..*', name)
    if match:
      names[('params', f'layer{match[1]}_{match[2]}')] = ()
    elif name == 'conv1.weight':
      names['params', 'conv1', 'kernel'] = _to_flax(array).shape
    elif name == 'fc.weight':
      names['params', 'fc', 'kernel'] = _to_flax(array).shape
  if 'conv1.weight' not in arrays:
    raise ValueError('Not a torchvision ResNet state dict: conv1.weight is missing '
                     f'(keys like {sorted(arrays)[:5]}).')
  if 'fc.bias' in arrays and 'fc.weight' not in arrays:
    raise ValueError('The state dict has fc.bias but fc.weight is missing.')
  model = ResNet(**architecture(names))
  expected = {_torchvision_name(p): _from_flax_shape(s) for p, s in _expected_shapes(model).items()}
  _check(expected, {k: v.shape for k, v in arrays.items()}, str, 'The torchvision weights')
  flax_path = {_torchvision_name(p): p for p in _expected_shapes(model)}
  return _unflatten({flax_path[k]: np.ascontiguousarray(_to_flax(v), np.float32)
                     for k, v in arrays.items()})
