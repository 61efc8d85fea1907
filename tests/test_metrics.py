"""Each metric against an independent computation: sklearn, scipy, or a plain loop."""

import math

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as skm

from ucam_jax import metrics


def random_probs(rng, n, c, sharpness=3.0):
  logits = sharpness * rng.normal(size=(n, c))
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  return p / p.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------- accuracy


def test_accuracy():
  assert metrics.accuracy([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5
  assert metrics.accuracy(np.array(['a', 'b']), np.array(['a', 'b'])) == 1.0


@pytest.mark.parametrize('matches, expected', [
    # m of 10 annotators agree. Leaving out a matching annotator leaves m-1 matches,
    # leaving out any other leaves m: acc = (m*min((m-1)/3,1) + (10-m)*min(m/3,1)) / 10.
    (0, 0.0),  # every subset has 0 matches
    (1, 0.3),  # (1*0 + 9*(1/3)) / 10 = 3/10
    (2, 0.6),  # (2*(1/3) + 8*(2/3)) / 10 = (2/3 + 16/3) / 10 = 6/10
    (3, 0.9),  # (3*(2/3) + 7*1) / 10 = (2 + 7) / 10
    (4, 1.0),  # (4*1 + 6*1) / 10: every subset keeps >= 3 matches
    (10, 1.0),  # (10*1) / 10
])
def test_vqa_accuracy_hand_worked(matches, expected):
  humans = ['yes'] * matches + [f'no{i}' for i in range(10 - matches)]
  acc = metrics.vqa_accuracy(['yes'], [humans])
  assert acc.shape == (1,)
  assert acc[0] == pytest.approx(expected)


def test_vqa_accuracy_batch_matches_loop():
  rng = np.random.default_rng(0)
  vocab = ['yes', 'no', '2', 'red']
  humans = [list(rng.choice(vocab, size=10)) for _ in range(50)]
  preds = list(rng.choice(vocab, size=50))
  expected = []
  for pred, answers in zip(preds, humans):
    subsets = [answers[:j] + answers[j + 1:] for j in range(10)]
    expected.append(sum(min(s.count(pred) / 3, 1) for s in subsets) / 10)
  np.testing.assert_allclose(metrics.vqa_accuracy(preds, humans), expected)


# ---------------------------------------------------------------------- calibration


def ece_loop(probs, labels, num_bins):
  """Independent top-label ECE: bins (lo, hi] built one by one."""
  edges = np.linspace(0, 1, num_bins + 1)
  total = 0.0
  for b in range(num_bins):
    lo, hi = edges[b], edges[b + 1]
    members = [i for i in range(len(labels))
               if (lo < probs[i].max() <= hi) or (b == 0 and probs[i].max() == 0)]
    if not members:
      continue
    conf = sum(probs[i].max() for i in members) / len(members)
    acc = sum(int(np.argmax(probs[i]) == labels[i]) for i in members) / len(members)
    total += len(members) / len(labels) * abs(acc - conf)
  return total


@pytest.mark.parametrize('seed, c', [(0, 3), (1, 10), (2, 2)])
def test_ece_matches_loop(seed, c):
  rng = np.random.default_rng(seed)
  probs = random_probs(rng, 400, c)
  labels = rng.integers(0, c, size=400)
  got = metrics.expected_calibration_error(probs, labels)
  assert got == pytest.approx(ece_loop(probs, labels, 15), abs=1e-12)
  assert got > 0.01  # random labels are badly calibrated: the check is not vacuous


def test_ece_bin_edges_are_right_closed():
  # Confidence 0.5 belongs to bin (0.25, 0.5], not (0.5, 0.75], with 4 bins.
  probs = np.array([[0.5, 0.5], [0.9, 0.1]])
  labels = np.array([1, 0])  # first is wrong (argmax takes class 0), second right
  conf, acc, count = metrics.reliability_bins(probs, labels, num_bins=4)
  np.testing.assert_array_equal(count, [0, 1, 0, 1])
  np.testing.assert_allclose(conf[[1, 3]], [0.5, 0.9])
  np.testing.assert_allclose(acc[[1, 3]], [0.0, 1.0])
  assert np.isnan(conf[0]) and np.isnan(acc[2])
  # ECE = 1/2 * |0 - 0.5| + 1/2 * |1 - 0.9| = 0.25 + 0.05
  assert metrics.expected_calibration_error(probs, labels, num_bins=4) == pytest.approx(0.3)


def test_reliability_bins_counts_sum_to_n():
  rng = np.random.default_rng(3)
  probs = random_probs(rng, 100, 5)
  _, _, count = metrics.reliability_bins(probs, rng.integers(0, 5, 100))
  assert count.shape == (15,) and count.sum() == 100


def test_nll_matches_sklearn():
  rng = np.random.default_rng(4)
  probs = random_probs(rng, 200, 6, sharpness=1.0)
  labels = rng.integers(0, 6, size=200)
  expected = skm.log_loss(labels, probs, labels=np.arange(6))
  assert metrics.negative_log_likelihood(probs, labels) == pytest.approx(expected, rel=1e-10)


def test_nll_clips_zero_probability():
  probs = np.array([[1.0, 0.0], [0.5, 0.5]])
  got = metrics.negative_log_likelihood(probs, np.array([1, 0]))
  assert got == pytest.approx((-math.log(metrics.PROB_CLIP) + math.log(2)) / 2)


def test_brier_matches_loop_and_sklearn_binary():
  rng = np.random.default_rng(5)
  probs = random_probs(rng, 150, 4)
  labels = rng.integers(0, 4, size=150)
  loop = sum(sum((probs[i, k] - (k == labels[i])) ** 2 for k in range(4))
             for i in range(150)) / 150
  assert metrics.brier_score(probs, labels) == pytest.approx(loop, rel=1e-12)

  binary = random_probs(rng, 150, 2)
  y = rng.integers(0, 2, size=150)
  # Summing over both classes counts the binary squared error twice.
  expected = 2 * skm.brier_score_loss(y, binary[:, 1])
  assert metrics.brier_score(binary, y) == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------ uncertainty vs. errors


def tied_scores(rng, n):
  # Few distinct values so that many scores tie, across both classes.
  return rng.integers(0, 6, size=n) / 5.0


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('ties', [False, True])
def test_auroc_and_aupr_match_sklearn(seed, ties):
  rng = np.random.default_rng(seed)
  wrong = rng.random(300) < 0.3
  scores = tied_scores(rng, 300) if ties else rng.normal(size=300)
  scores = scores + 0.5 * wrong  # informative, so the values are far from 0.5
  assert metrics.auroc(scores, wrong) == pytest.approx(skm.roc_auc_score(wrong, scores))
  assert metrics.aupr(scores, wrong) == pytest.approx(
      skm.average_precision_score(wrong, scores))


def test_auroc_aupr_hand_example():
  # Positives at 0.9 and 0.5, negatives at 0.5 and 0.1: pairs (0.9>0.5, 0.9>0.1,
  # 0.5=0.5 counts 1/2, 0.5>0.1) -> AUROC = 3.5 / 4.
  scores = [0.9, 0.5, 0.5, 0.1]
  wrong = [True, True, False, False]
  assert metrics.auroc(scores, wrong) == pytest.approx(0.875)
  # Thresholds 0.9: P=1, R=1/2; 0.5: P=2/3, R=1; AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
  assert metrics.aupr(scores, wrong) == pytest.approx(5 / 6)


def test_auroc_aupr_single_class_is_nan():
  assert math.isnan(metrics.auroc([0.1, 0.2], [False, False]))
  assert math.isnan(metrics.aupr([0.1, 0.2], [True, True]))


def test_retention_curve_hand_example():
  uncertainty = [0.1, 0.9, 0.3, 0.3, 0.5]
  correct = [True, False, False, True, True]
  # Stable ascending order: 0 (0.1, right), 2 (0.3, wrong), 3 (0.3, right), 4, 1.
  fractions = [0.2, 0.4, 0.6, 0.8, 1.0]
  acc, area = metrics.retention_curve(uncertainty, correct, fractions)
  np.testing.assert_allclose(acc, [1.0, 1 / 2, 2 / 3, 3 / 4, 3 / 5])
  trapezoid = 0.2 * sum((a + b) / 2 for a, b in zip(acc[:-1], acc[1:]))
  assert area == pytest.approx(trapezoid)


def test_retention_curve_matches_loop():
  rng = np.random.default_rng(6)
  uncertainty = tied_scores(rng, 97)
  correct = rng.random(97) < 0.6
  fractions = np.linspace(0.05, 1.0, 20)
  order = sorted(range(97), key=lambda i: uncertainty[i])  # Python's sort is stable
  expected = []
  for f in fractions:
    k = max(1, round(f * 97))
    expected.append(sum(correct[i] for i in order[:k]) / k)
  acc, _ = metrics.retention_curve(uncertainty, correct, fractions)
  np.testing.assert_allclose(acc, expected)


# ----------------------------------------------------------------- attention quality


def test_average_ranks_matches_scipy():
  rng = np.random.default_rng(7)
  x = rng.integers(0, 4, size=(5, 3, 30)).astype(float)
  np.testing.assert_allclose(metrics.average_ranks(x),
                             scipy.stats.rankdata(x, method='average', axis=-1))


def test_spearman_matches_scipy_with_ties():
  rng = np.random.default_rng(8)
  maps = rng.random((20, 14, 14))
  maps[:5] = np.round(maps[:5] * 3)  # heavily tied predictions too
  targets = np.where(rng.random((20, 14, 14)) < 0.7, 0.0, rng.random((20, 14, 14)))
  targets[10:] += 0.3 * maps[10:]  # some genuine correlation
  expected = [scipy.stats.spearmanr(m.ravel(), t.ravel()).statistic
              for m, t in zip(maps, targets)]
  got = metrics.spearman_per_example(maps, targets)
  assert got.shape == (20,)
  np.testing.assert_allclose(got, expected, atol=1e-12)


def test_spearman_constant_map_is_nan_and_mean_skips_it():
  rng = np.random.default_rng(9)
  maps = rng.random((3, 4, 4))
  maps[1] = 0.25
  targets = maps + 0.1 * rng.random((3, 4, 4))
  rho = metrics.spearman_per_example(maps, targets)
  assert math.isnan(rho[1]) and not np.isnan(rho[[0, 2]]).any()
  assert metrics.mean_ignoring_nan(rho) == pytest.approx((rho[0] + rho[2]) / 2)
  assert math.isnan(metrics.mean_ignoring_nan([np.nan]))


def test_pointing_game_hand_example():
  maps = np.array([
      [[0.1, 0.9], [0.2, 0.3]],  # peak at (0, 1)
      [[0.5, 0.5], [0.1, 0.1]],  # tie: first in row-major order, (0, 0)
      [[0.0, 0.0], [0.0, 0.7]],  # peak at (1, 1)
  ])
  targets = np.array([
      [[0, 1], [0, 0]],
      [[0, 1], [0, 0]],
      [[1, 1], [1, 0]],
  ])
  np.testing.assert_array_equal(metrics.pointing_game(maps, targets), [True, False, False])


def test_top_mass_cells_hand_example():
  targets = np.array([
      [[0.5, 0.2], [0.2, 0.1]],  # 15% of 1.0: the 0.5 cell alone
      [[0.1, 0.1], [0.1, 0.1]],  # uniform: every cell ties with the first
      [[0.0, 1.0], [1.0, 0.0]],  # a binary mask: the whole mask
      [[0.0, 0.0], [0.0, 0.0]],  # nothing to point at
  ])
  np.testing.assert_array_equal(metrics.top_mass_cells(targets), [
      [[1, 0], [0, 0]], [[1, 1], [1, 1]], [[0, 1], [1, 0]], [[0, 0], [0, 0]]])
  np.testing.assert_array_equal(metrics.top_mass_cells(targets[:1], mass=0.6),
                                [[[1, 1], [1, 0]]])  # 0.5 + 0.2 (+ its tie 0.2) >= 0.6
  maps = np.array([[[0, 1], [0, 0]], [[0, 0], [0, 1]], [[1, 0], [0, 0]], [[1, 0], [0, 0]]])
  hits, chance = metrics.pointing_game_top_mass(maps, targets)
  np.testing.assert_array_equal(hits, [False, True, False, False])
  np.testing.assert_allclose(chance, [0.25, 1, 0.5, 0])


def test_pointing_game_of_a_random_map_is_at_chance_on_dense_maps():
  """Human-like maps: a blob on a floor that is non-zero everywhere (as VQA-HAT's at the 14x14
  grid). Any map 'points' into them by the > 0 test; against their top 15% mass a random map
  sits at the chance level and a map peaked on the blob hits."""
  rng = np.random.default_rng(0)
  n, g = 4000, 14
  y, x = np.mgrid[:g, :g]
  centres = rng.integers(2, g - 2, (n, 2))
  blobs = np.exp(-((y - centres[:, :1, None]) ** 2 + (x - centres[:, 1:, None]) ** 2) / 8)
  humans = blobs + 0.05 + 0.02 * rng.random((n, g, g))
  random_maps = rng.random((n, g, g))
  assert metrics.pointing_game(random_maps, humans).mean() == 1.0  # says nothing
  hits, chance = metrics.pointing_game_top_mass(random_maps, humans)
  level = chance.mean()
  assert 0.01 < level < 0.2
  # Binomial standard error of the mean hit rate: sqrt(p (1 - p) / n).
  assert abs(hits.mean() - level) < 4 * np.sqrt(level * (1 - level) / n)
  assert metrics.pointing_game_top_mass(blobs, humans)[0].mean() == 1.0


# ----------------------------------------------------------------------- faithfulness


def object_score_fn(object_mask):
  """Fraction of the object's (all-ones) pixels still present, per image."""
  calls = []

  def score_fn(batch):
    calls.append(batch.shape)
    present = (batch[..., 0] * object_mask).sum(axis=(1, 2))
    return present / object_mask.sum(axis=(1, 2))

  return score_fn, calls


def test_deletion_insertion_exact_hand_case():
  # One 1x4 image; the object is pixels 0 and 1. steps=4 removes one pixel a step.
  images = np.ones((1, 1, 4, 1))
  obj = np.array([[[1.0, 1.0, 0.0, 0.0]]])
  score_fn, calls = object_score_fn(obj)
  perfect = np.array([[[3.0, 2.0, 1.0, 0.0]]])
  # Deletion scores 1, .5, 0, 0, 0 -> 0.25 * (0.75 + 0.25) = 0.25.
  # Insertion scores 0, .5, 1, 1, 1 -> 0.25 * (0.25 + 0.75 + 1 + 1) = 0.75.
  deletion, insertion = metrics.deletion_insertion_auc(score_fn, images, perfect, steps=4)
  np.testing.assert_allclose(deletion, [0.25])
  np.testing.assert_allclose(insertion, [0.75])
  assert calls == [(1, 1, 4, 1)] * 10  # steps + 1 calls per mode, whole batch each time
  # Reversed map: deletion 1, 1, 1, .5, 0 -> 0.75; insertion 0, 0, 0, .5, 1 -> 0.25.
  deletion, insertion = metrics.deletion_insertion_auc(score_fn, images, -perfect, steps=4)
  np.testing.assert_allclose(deletion, [0.75])
  np.testing.assert_allclose(insertion, [0.25])


def test_deletion_insertion_perfect_beats_reversed_with_upsampling():
  rng = np.random.default_rng(10)
  n, h, w, scale = 6, 4, 4, 3
  cell_obj = (rng.random((n, h, w)) < 0.3).astype(float)
  cell_obj[:, 0, 0] = 1.0  # every image has an object
  obj = cell_obj.repeat(scale, axis=1).repeat(scale, axis=2)
  images = rng.uniform(0.5, 1.0, size=(n, h * scale, w * scale, 3))
  score_fn, calls = object_score_fn(obj)

  def fraction_present(batch):  # object pixels that still hold the image value
    return score_fn((batch[..., :1] == images[..., :1]).astype(float))

  perfect = cell_obj + 0.01 * rng.random((n, h, w))
  del_good, ins_good = metrics.deletion_insertion_auc(fraction_present, images, perfect,
                                                      steps=7)
  del_bad, ins_bad = metrics.deletion_insertion_auc(fraction_present, images, -perfect,
                                                    steps=7)
  assert del_good.shape == ins_good.shape == (n,)
  assert np.all(del_good < del_bad) and np.all(ins_good > ins_bad)
  for auc in (del_good, ins_good, del_bad, ins_bad):
    assert np.all((0 <= auc) & (auc <= 1))
  assert len(calls) == 4 * (7 + 1) and all(s[0] == n for s in calls)


def test_deletion_uses_given_baseline_and_breaks_ties_row_major():
  images = np.ones((1, 2, 2, 1))
  maps = np.zeros((1, 2, 2))  # all tied: cells go in row-major order
  seen = []

  def score_fn(batch):
    seen.append(batch[0, ..., 0].copy())
    return np.zeros(len(batch))

  metrics.deletion_insertion_auc(score_fn, images, maps, steps=4, baseline=-1.0)
  np.testing.assert_array_equal(seen[1], [[-1, 1], [1, 1]])  # deletion after one step
  np.testing.assert_array_equal(seen[2], [[-1, -1], [1, 1]])
  np.testing.assert_array_equal(seen[5 + 1], [[1, -1], [-1, -1]])  # insertion, one step


def test_deletion_rejects_non_multiple_grid():
  with pytest.raises(ValueError, match=r'multiple of the map grid'):
    metrics.deletion_insertion_auc(lambda b: np.zeros(len(b)), np.ones((1, 5, 4, 1)),
                                   np.ones((1, 2, 2)), steps=2)


# ------------------------------------------------------------------------ validation


@pytest.mark.parametrize('call', [
    lambda: metrics.accuracy([1, 2], [1, 2, 3]),
    lambda: metrics.vqa_accuracy(['a'], [['a'] * 10, ['b'] * 10]),
    lambda: metrics.expected_calibration_error(np.ones((3, 2)) / 2, [0, 1]),
    lambda: metrics.negative_log_likelihood(np.ones((3, 2)) / 2, [0, 1]),
    lambda: metrics.auroc([0.1, 0.2, 0.3], [True, False]),
    lambda: metrics.retention_curve([0.1, 0.2], [True], [1.0]),
    lambda: metrics.spearman_per_example(np.ones((2, 3, 3)), np.ones((2, 3, 4))),
    lambda: metrics.pointing_game(np.ones((2, 3, 3)), np.ones((1, 3, 3))),
    lambda: metrics.deletion_insertion_auc(lambda b: b.mean(axis=(1, 2, 3)),
                                           np.ones((2, 4, 4, 1)), np.ones((3, 2, 2)), 2),
])
def test_mismatched_inputs_raise_with_shapes(call):
  with pytest.raises(ValueError, match=r'Mismatched .*\(\d'):
    call()


def test_wrong_rank_and_bad_labels_raise():
  with pytest.raises(ValueError, match=r'probs must have 2 dimension\(s\), got shape \(3,\)'):
    metrics.brier_score(np.ones(3), [0, 1, 2])
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 2\)'):
    metrics.brier_score(np.ones((2, 2)) / 2, [0, 2])
