"""Grounded shapes: procedural VQA whose ground-truth attention is exact (SPEC section 6).

Each image holds `min_objects`..`max_objects` non-overlapping shapes (circle, square, triangle) in
five colours on a plain background, drawn without anti-aliasing, so every pixel belongs to exactly
one object or to the background. Each image gets up to `questions_per_image` distinct questions,
drawn from four families in turn:

  family     example                                    answer    mask (ground truth)
  attribute  what colour is the triangle?               a colour  the object asked about
             what shape is the red object?              a shape   the object asked about
  existence  is there a blue circle?                    yes / no  yes: every matching object;
                                                                  no: every object
  counting   how many red objects are there?            0..6      n > 0: the n matching objects;
                                                                  0: every object
  spatial    what shape is left of the blue circle?     a shape   the anchor (the blue circle)
             what colour is the object above the ...?   a colour  and the one object so related

The mask is the union of the referred objects' pixels. When nothing matches ("no", "0") the
question still ranges over every object, each of which must be looked at to rule it out, so the
mask is all objects (never empty: rank correlation and pointing game stay defined). Evaluations
that want referent-only questions drop existence "no" and counting "0" (family + answer).

Questions are unambiguous: attribute questions name a shape or colour that exactly one object has;
a spatial anchor is described uniquely, and the question is asked only when exactly one object is
strictly in the relation (pixel extents disjoint along that axis) and no other object's centre is
on that side. Existence answers are drawn yes/no with equal odds and counting answers uniformly
over the counts the image offers, so priors help little (majority answer: existence ~52%,
counting ~37%: 0 and 1 are on offer in every image, 3 and 4 in few).

Everything is a pure function of (seed, split, image id): one numpy generator per image. The
settings are the builder config's name, so a build with other settings lands in another directory.
The builder writes array_record with the same features as easy-VQA (plus 'family'), read back
without TensorFlow.
"""

import collections
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from ucam_jax.datasets.easy_vqa import encode_png

SHAPES = ('circle', 'square', 'triangle')
COLOURS = {'red': (220, 40, 40), 'green': (40, 160, 60), 'blue': (40, 90, 220),
           'yellow': (230, 190, 20), 'purple': (140, 60, 180)}
BACKGROUND = (235, 235, 235)
MAX_OBJECTS = 6  # The counting answers are 0..MAX_OBJECTS, so the answer list never changes.
ANSWERS = (*SHAPES, *COLOURS, 'yes', 'no', *(str(n) for n in range(MAX_OBJECTS + 1)))
FAMILIES = ('attribute', 'existence', 'counting', 'spatial')
SPLITS = ('train', 'test')
MIN_IMAGE_SIZE = 32
GAP = 2  # Pixels between the bounding boxes of two objects, so that no two masks touch.
# Objects are squares of side [0.14, 0.25] x image_size. Random placement is tried only while the
# objects' boxes (with gap) fill at most this fraction of the image, so it always succeeds fast.
SIZE_RANGE = (0.14, 0.25)
MAX_FILL = 0.45


def _object_size_range(image_size: int) -> tuple[int, int]:
  return max(6, round(SIZE_RANGE[0] * image_size)), round(SIZE_RANGE[1] * image_size)


@dataclasses.dataclass(eq=False)
class GroundedShapesConfig(tfds.core.BuilderConfig):
  """The generator's settings (these defaults); build it with `make_config`, which names it."""
  seed: int = 0
  num_train_images: int = 2000
  num_test_images: int = 500
  image_size: int = 64
  min_objects: int = 2
  max_objects: int = 4
  questions_per_image: int = 8
  # The question families asked, a bit mask over FAMILIES (1 attribute, 2 existence, 4 counting,
  # 8 spatial): 15, every family.
  families: int = 15


SETTINGS = tuple(f.name for f in dataclasses.fields(GroundedShapesConfig)
                 if f.name not in {g.name for g in dataclasses.fields(tfds.core.BuilderConfig)})


def make_config(**settings) -> GroundedShapesConfig:
  """Checks the settings (a ValueError names the bad one) and names the config after them: the
  name is the build directory, so other settings never reuse a build."""
  c = GroundedShapesConfig(name='', **settings)
  for key in SETTINGS:
    value = getattr(c, key)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
      raise ValueError(f'grounded_shapes: {key} must be an integer, got {value!r}.')
    if value < (0 if key == 'seed' else 1):
      raise ValueError(f'grounded_shapes: {key}={value} must be at least '
                       f'{0 if key == "seed" else 1}.')
  if c.image_size < MIN_IMAGE_SIZE:
    raise ValueError(f'grounded_shapes: image_size={c.image_size} is too small; objects need at '
                     f'least {MIN_IMAGE_SIZE} pixels.')
  if c.max_objects < c.min_objects:
    raise ValueError(f'grounded_shapes: max_objects={c.max_objects} is below '
                     f'min_objects={c.min_objects}.')
  if c.max_objects > MAX_OBJECTS:
    raise ValueError(f'grounded_shapes: max_objects={c.max_objects} exceeds {MAX_OBJECTS}, the '
                     'largest count in the fixed answer list.')
  largest = _object_size_range(c.image_size)[1] + GAP
  fit = int(MAX_FILL * c.image_size**2 // largest**2)
  if c.max_objects > fit:
    raise ValueError(f'grounded_shapes: max_objects={c.max_objects} objects do not fit in '
                     f'image_size={c.image_size} images (at most {fit} objects of up to '
                     f'{largest - GAP} pixels fit); lower max_objects or raise image_size.')
  if not 0 < c.families < 2 ** len(FAMILIES):
    raise ValueError(f'grounded_shapes: families={c.families} must be a bit mask of FAMILIES '
                     f'{FAMILIES}, 1 to {2 ** len(FAMILIES) - 1}.')
  name = (f'seed{c.seed}_train{c.num_train_images}_test{c.num_test_images}_size{c.image_size}'
          f'_objects{c.min_objects}to{c.max_objects}_questions{c.questions_per_image}')
  if c.families != 2 ** len(FAMILIES) - 1:  # Every family: the name that builds always had.
    name += f'_families{c.families}'
  return dataclasses.replace(c, name=name, version=GroundedShapes.VERSION)


def asked_families(families: int) -> tuple[str, ...]:
  """The families of a `families` bit mask."""
  return tuple(f for i, f in enumerate(FAMILIES) if families >> i & 1)


@dataclasses.dataclass(frozen=True)
class Object:
  """One drawn object. `mask` is [image_size, image_size] bool: exactly its pixels."""
  shape: str
  colour: str
  mask: np.ndarray

  @property
  def extent(self) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of its pixels, inclusive."""
    rows, cols = np.flatnonzero(self.mask.any(1)), np.flatnonzero(self.mask.any(0))
    return rows[0], rows[-1], cols[0], cols[-1]


@dataclasses.dataclass(frozen=True)
class Question:
  family: str
  question: str
  answer: str
  referred: tuple[int, ...]  # Indices into the scene's objects: the ground-truth attention.


@dataclasses.dataclass(frozen=True)
class Scene:
  """One image ([image_size, image_size, 3] uint8), its objects and its questions."""
  image: np.ndarray
  objects: list[Object]
  questions: list[Question]

  def mask(self, question: Question) -> np.ndarray:
    """[image_size, image_size] bool: the union of the referred objects' pixels."""
    return np.any([self.objects[i].mask for i in question.referred], axis=0)


def shape_mask(shape: str, top: int, left: int, size: int, image_size: int) -> np.ndarray:
  """[image_size, image_size] bool: the pixels whose centres lie inside the shape drawn in the
  box [top, top + size) x [left, left + size). Triangles point up, with their base at the bottom."""
  y, x = np.mgrid[:image_size, :image_size] + 0.5
  dy, dx = y - top, x - left - size / 2  # From the top centre of the box.
  inside_box = (dy >= 0) & (dy <= size) & (np.abs(dx) <= size / 2)
  if shape == 'square':
    return inside_box
  if shape == 'circle':
    return (dy - size / 2)**2 + dx**2 <= (size / 2)**2
  if shape == 'triangle':
    return inside_box & (np.abs(dx) <= dy / 2)
  raise ValueError(f'Unknown shape {shape!r}; known: {SHAPES}.')


def _place_objects(rng: np.random.Generator, count: int, image_size: int):
  """`count` boxes (top, left, size), at least GAP pixels apart, by rejection sampling."""
  low, high = _object_size_range(image_size)
  for _ in range(100):
    boxes = []
    for _ in range(100 * count):
      size = int(rng.integers(low, high + 1))
      top, left = (int(v) for v in rng.integers(0, image_size - size + 1, size=2))
      if all(top >= t + s + GAP or t >= top + size + GAP or left >= l + s + GAP
             or l >= left + size + GAP for t, l, s in boxes):
        boxes.append((top, left, size))
        if len(boxes) == count:
          return boxes
  raise RuntimeError(f'Could not place {count} objects in a {image_size}-pixel image.')


def _unique(objects, i, keys) -> bool:
  """Whether object i is the only one with its value of every attribute in `keys`."""
  mine = tuple(getattr(objects[i], k) for k in keys)
  return sum(tuple(getattr(o, k) for k in keys) == mine for o in objects) == 1


def _descriptions(objects, i) -> list[str]:
  """The ways to name object i that fit it alone, e.g. 'triangle', 'red object', 'red triangle'."""
  o = objects[i]
  names = [o.shape] if _unique(objects, i, ['shape']) else []
  names += [f'{o.colour} object'] if _unique(objects, i, ['colour']) else []
  return names or ([f'{o.colour} {o.shape}'] if _unique(objects, i, ['colour', 'shape']) else [])


def _related(objects, anchor: int, relation: str) -> list[int] | None:
  """The objects in `relation` to the anchor, or None when some object is only partly so.

  'left of': its rightmost pixel is left of the anchor's leftmost pixel. An object whose centre
  is left of the anchor's but which overlaps it in columns would make the question ambiguous.
  """
  top, bottom, left, right = objects[anchor].extent
  found, ambiguous = [], False
  for i, o in enumerate(objects):
    if i == anchor:
      continue
    t, b, l, r = o.extent
    strict, centre = {'left of': (r < left, l + r < left + right),
                      'right of': (l > right, l + r > left + right),
                      'above': (b < top, t + b < top + bottom),
                      'below': (t > bottom, t + b > top + bottom)}[relation]
    if strict:
      found.append(i)
    elif centre:
      ambiguous = True
  return None if ambiguous else found


def _matching(objects, colour, shape) -> tuple[int, ...]:
  return tuple(i for i, o in enumerate(objects)
               if colour in (None, o.colour) and shape in (None, o.shape))


def _predicate_text(colour, shape, plural: bool) -> str:
  noun = shape or 'object'
  return ' '.join(filter(None, [colour, noun + ('s' if plural else '')]))


def candidate_questions(objects: list[Object]) -> dict[str, list[Question]]:
  """Every question the generator may ask about these objects, by family."""
  everything = tuple(range(len(objects)))
  out = {family: [] for family in FAMILIES}
  for i, o in enumerate(objects):
    if _unique(objects, i, ['shape']):
      out['attribute'].append(Question('attribute', f'what colour is the {o.shape}?', o.colour,
                                       (i,)))
    if _unique(objects, i, ['colour']):
      out['attribute'].append(Question('attribute', f'what shape is the {o.colour} object?',
                                       o.shape, (i,)))
  predicates = ([(c, None) for c in COLOURS] + [(None, s) for s in SHAPES]
                + [(c, s) for c in COLOURS for s in SHAPES])
  for colour, shape in predicates:
    found = _matching(objects, colour, shape)
    out['existence'].append(Question(
        'existence', f'is there a {_predicate_text(colour, shape, False)}?',
        'yes' if found else 'no', found or everything))
    out['counting'].append(Question(
        'counting', f'how many {_predicate_text(colour, shape, True)} are there?',
        str(len(found)), found or everything))
  for anchor in range(len(objects)):
    for name in _descriptions(objects, anchor):
      for relation in ('left of', 'right of', 'above', 'below'):
        found = _related(objects, anchor, relation)
        if found is None or len(found) != 1:
          continue
        target = objects[found[0]]
        referred = tuple(sorted((anchor, found[0])))
        out['spatial'].append(Question('spatial', f'what shape is {relation} the {name}?',
                                       target.shape, referred))
        out['spatial'].append(Question(
            'spatial', f'what colour is the object {relation} the {name}?', target.colour,
            referred))
  return out


def _pick(rng: np.random.Generator, family: str, candidates: list[Question]) -> Question:
  """One candidate; existence and counting first draw the answer uniformly, for balance."""
  if family in ('existence', 'counting'):
    answers = sorted({q.answer for q in candidates})
    answer = answers[rng.integers(len(answers))]
    candidates = [q for q in candidates if q.answer == answer]
  return candidates[rng.integers(len(candidates))]


def choose_questions(rng: np.random.Generator, objects: list[Object], count: int,
                     families: tuple[str, ...] = FAMILIES) -> list[Question]:
  """Up to `count` distinct questions of `families`, cycling over them in a random order (a
  family with nothing left to ask is skipped)."""
  candidates = {f: q if f in families else [] for f, q in candidate_questions(objects).items()}
  order = [FAMILIES[i] for i in rng.permutation(len(FAMILIES))]
  chosen = []
  while len(chosen) < count and any(candidates.values()):
    for family in order:
      if candidates[family] and len(chosen) < count:
        question = _pick(rng, family, candidates[family])
        candidates[family].remove(question)
        chosen.append(question)
  return chosen


def generate_scene(config: GroundedShapesConfig, split: str, image_id: int) -> Scene:
  """The image, objects and questions of one image: a pure function of its arguments."""
  rng = np.random.default_rng([config.seed, SPLITS.index(split), image_id])
  size = config.image_size
  count = int(rng.integers(config.min_objects, config.max_objects + 1))
  image = np.empty((size, size, 3), np.uint8)
  image[:] = BACKGROUND
  objects = []
  for top, left, side in _place_objects(rng, count, size):
    shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
    mask = shape_mask(shape, top, left, side, size)
    image[mask] = COLOURS[colour]
    objects.append(Object(shape, colour, mask))
  return Scene(image, objects, choose_questions(rng, objects, config.questions_per_image,
                                                    asked_families(config.families)))


def summary(split: str, num_images: int, questions: list[Question]) -> str:
  """A short table: questions per family and each family's answer histogram."""
  lines = [f'grounded_shapes {split}: {num_images} images, {len(questions)} questions']
  for family in FAMILIES:
    answers = collections.Counter(q.answer for q in questions if q.family == family)
    total = sum(answers.values())
    order = sorted(answers, key=ANSWERS.index)
    histogram = ' '.join(f'{a}:{answers[a]}' for a in order)
    lines.append(f'  {family:<9} {total:>7}  {histogram}')
  return '\n'.join(lines)


class GroundedShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Several coloured shapes per image; questions whose ground-truth attention is exact."""

  name = 'ucam_grounded_shapes'  # Not registered with TFDS: see datasets.easy_vqa.EasyVqa.

  # Bump on any change to what the generator draws: the build directory is named by the version
  # and the settings, so an old build would otherwise be reused.
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Four question families, masks of the referred objects.'}

  def __init__(self, *, config: GroundedShapesConfig | None = None, **kwargs):
    """The settings (see `SETTINGS`) come as keywords, as `config.dataset_kwargs` passes them, or
    as a `config` from `make_config`; the other keywords go to TFDS (data_dir, ...)."""
    settings = {key: kwargs.pop(key) for key in SETTINGS if key in kwargs}
    if config is None:
      config = make_config(**settings)
    elif settings:
      raise ValueError(f'grounded_shapes: pass either a config or settings, not both: {settings}.')
    kwargs.setdefault('file_format', tfds.core.FileFormat.ARRAY_RECORD)
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 3), encoding_format='png'),
            'mask': tfds.features.Image(shape=(size, size, 1), encoding_format='png'),
            'question': tfds.features.Text(),
            'answer': tfds.features.ClassLabel(names=ANSWERS),
            'image_id': np.int32,
            'family': tfds.features.ClassLabel(names=FAMILIES),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Procedural: nothing to download.
    config = self.builder_config
    return {'train': self._generate_examples('train', config.num_train_images),
            'test': self._generate_examples('test', config.num_test_images)}

  def _generate_examples(self, split: str, num_images: int):
    asked = []
    for image_id in range(num_images):
      scene = generate_scene(self.builder_config, split, image_id)
      png = encode_png(scene.image)
      for index, question in enumerate(scene.questions):
        mask = scene.mask(question).astype(np.uint8) * 255  # 0 / 255, as easy-VQA.
        yield f'{image_id}_{index}', {
            'image': png, 'mask': encode_png(mask), 'question': question.question,
            'answer': question.answer, 'image_id': image_id, 'family': question.family}
      asked += scene.questions
    print('\n' + summary(split, num_images, asked), flush=True)  # After TFDS's progress bar.
