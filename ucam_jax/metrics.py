"""Evaluation metrics (SPEC section 7): pure NumPy, run on host-gathered arrays.

Conventions: `n` examples, `c` classes, maps on an `[h, w]` grid. `probs` rows are
probability vectors (softmax outputs); `labels` are integer class indices. Inputs of the
wrong rank or with mismatched lengths raise `ValueError` naming the argument and shapes.

Definition choices that a reader must know:
- Log probabilities clip p to `[PROB_CLIP, 1]` so a zero probability costs -log(1e-12).
- ECE is top-label, with `num_bins` equal-width bins (i/B, (i+1)/B] on the max
  probability (a confidence of exactly 0 falls in the first bin), weighted by bin count.
- AUROC / AUPR treat a wrong answer as the positive class and a higher score as "more
  likely wrong"; they return nan (no warning, no error) when only one class is present.
- Ties: AUROC and Spearman use average ranks; AUPR groups tied scores into one threshold
  (as sklearn); retention keeps tied uncertainties in input order (stable sort); the
  pointing game and deletion/insertion break ties by row-major cell index (first wins).
"""

from collections.abc import Callable, Sequence

import numpy as np

PROB_CLIP = 1e-12


# --------------------------------------------------------------------------- helpers


def _as_array(name: str, x, ndim: int, dtype=None) -> np.ndarray:
  x = np.asarray(x, dtype=dtype)
  if x.ndim != ndim:
    raise ValueError(f'{name} must have {ndim} dimension(s), got shape {x.shape}.')
  return x


def _check_same_length(**arrays) -> int:
  """Returns the common leading length of named arrays, or raises naming their shapes."""
  lengths = {name: len(a) for name, a in arrays.items()}
  if len(set(lengths.values())) != 1:
    shapes = ', '.join(f'{name} {getattr(a, "shape", (len(a),))}' for name, a in arrays.items())
    raise ValueError(f'Mismatched lengths: {shapes}.')
  return next(iter(lengths.values()))


def _check_same_shape(**arrays) -> None:
  shapes = {name: np.shape(a) for name, a in arrays.items()}
  if len(set(shapes.values())) != 1:
    got = ', '.join(f'{name} {shape}' for name, shape in shapes.items())
    raise ValueError(f'Mismatched shapes: {got}.')


def _probs_and_labels(probs, labels) -> tuple[np.ndarray, np.ndarray]:
  probs = _as_array('probs', probs, 2, np.float64)
  labels = _as_array('labels', labels, 1)
  _check_same_length(probs=probs, labels=labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must be integer class indices, got dtype {labels.dtype}.')
  if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
    raise ValueError(f'labels must lie in [0, {probs.shape[1]}) for probs of shape '
                     f'{probs.shape}, got range [{labels.min()}, {labels.max()}].')
  return probs, labels


def _binary_scores(scores, is_positive) -> tuple[np.ndarray, np.ndarray]:
  scores = _as_array('scores', scores, 1, np.float64)
  is_positive = _as_array('is_positive', is_positive, 1).astype(bool)
  _check_same_length(scores=scores, is_positive=is_positive)
  return scores, is_positive


def average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks along the last axis, tied values sharing their average rank.

  Same as `scipy.stats.rankdata(x, method='average', axis=-1)`, vectorised over any
  leading axes. `x` must not contain nan.
  """
  x = np.asarray(x)
  m = x.shape[-1]
  order = np.argsort(x, axis=-1, kind='stable')
  s = np.take_along_axis(x, order, axis=-1)
  idx = np.broadcast_to(np.arange(m), s.shape)
  starts = np.ones(s.shape, bool)  # sorted position opens a run of equal values
  starts[..., 1:] = s[..., 1:] != s[..., :-1]
  ends = np.ones(s.shape, bool)  # sorted position closes a run
  ends[..., :-1] = starts[..., 1:]
  first = np.maximum.accumulate(np.where(starts, idx, 0), axis=-1)
  last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, idx, m - 1), -1), axis=-1), -1)
  ranks = np.empty(s.shape, np.float64)
  np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=-1)
  return ranks


# ------------------------------------------------------------------------- accuracy


def accuracy(pred, labels) -> float:
  """Exact-match accuracy: mean_n [pred_n == labels_n]. `pred`, `labels`: [n]."""
  pred = _as_array('pred', pred, 1)
  labels = _as_array('labels', labels, 1)
  _check_same_length(pred=pred, labels=labels)
  return float(np.mean(pred == labels))


def vqa_accuracy(pred_answers: Sequence[str],
                 human_answers: Sequence[Sequence[str]]) -> np.ndarray:
  """Official VQA accuracy per question, [n].

  For question n with k human answers (10 in VQA), acc_n = (1/k) sum_j min(m_{-j} / 3, 1),
  where m_{-j} counts the answers other than annotator j's that equal the prediction.
  With m matches among all 10 this is 0, 0.3, 0.6, 0.9, 1 for m = 0, 1, 2, 3, >=4.
  Strings must already be normalised (official punctuation / article / number rules).
  """
  _check_same_length(pred_answers=pred_answers, human_answers=human_answers)
  acc = np.zeros(len(pred_answers))
  for i, (pred, humans) in enumerate(zip(pred_answers, human_answers)):
    if isinstance(humans, str) or len(humans) == 0:
      raise ValueError(f'human_answers[{i}] must be a non-empty list of strings, '
                       f'got {humans!r}.')
    matches = np.array([h == pred for h in humans])
    others = matches.sum() - matches  # matches among the other k-1 annotators
    acc[i] = np.mean(np.minimum(others / 3.0, 1.0))
  return acc


# ---------------------------------------------------------------------- calibration


def reliability_bins(probs, labels, num_bins: int = 15
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Top-label reliability diagram: per-bin (confidence, accuracy, count), each [num_bins].

  `probs` [n, c], `labels` [n]. Confidence = max_c probs; a prediction is correct when
  argmax_c probs (first index on ties) equals the label. Bin b holds confidences in
  (b/B, (b+1)/B] (edges from `np.linspace(0, 1, B + 1)`; 0 goes to bin 0). Confidence and
  accuracy are bin means, nan for empty bins; count is the number of examples.
  """
  probs, labels = _probs_and_labels(probs, labels)
  confidence = probs.max(axis=1)
  correct = (probs.argmax(axis=1) == labels).astype(np.float64)
  inner_edges = np.linspace(0.0, 1.0, num_bins + 1)[1:-1]
  bins = np.searchsorted(inner_edges, confidence, side='left')  # right-closed bins
  count = np.bincount(bins, minlength=num_bins)
  with np.errstate(invalid='ignore', divide='ignore'):
    mean_conf = np.bincount(bins, confidence, num_bins) / count
    mean_acc = np.bincount(bins, correct, num_bins) / count
  return mean_conf, mean_acc, count


def expected_calibration_error(probs, labels, num_bins: int = 15) -> float:
  """Top-label ECE = sum_b (count_b / n) |accuracy_b - confidence_b|.

  `probs` [n, c], `labels` [n]; bins as in `reliability_bins` (15 equal-width on (0, 1]).
  """
  conf, acc, count = reliability_bins(probs, labels, num_bins)
  filled = count > 0
  return float(np.sum(count[filled] * np.abs(acc[filled] - conf[filled])) / count.sum())


def negative_log_likelihood(probs, labels) -> float:
  """Mean_n -log p_n[label_n], with p clipped to [PROB_CLIP, 1]. `probs` [n, c], `labels` [n]."""
  probs, labels = _probs_and_labels(probs, labels)
  p_true = probs[np.arange(len(labels)), labels]
  return float(-np.mean(np.log(np.clip(p_true, PROB_CLIP, 1.0))))


def brier_score(probs, labels) -> float:
  """Multi-class Brier: mean_n sum_c (probs_nc - onehot(labels_n)_c)^2, in [0, 2].

  `probs` [n, c], `labels` [n]. For c = 2 this is twice the binary Brier score.
  """
  probs, labels = _probs_and_labels(probs, labels)
  onehot = np.eye(probs.shape[1])[labels]
  return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


# ------------------------------------------------------------ uncertainty vs. errors


def auroc(scores, is_positive) -> float:
  """Area under the ROC curve, P(score_pos > score_neg) + P(tie) / 2 (Mann-Whitney U).

  `scores` [n] (higher = more likely wrong), `is_positive` [n] bool (True = wrong answer).
  Tied scores get average ranks, which equals the trapezoidal ROC area. Returns nan when
  only one class is present.
  """
  scores, is_positive = _binary_scores(scores, is_positive)
  n_pos = int(is_positive.sum())
  n_neg = len(is_positive) - n_pos
  if n_pos == 0 or n_neg == 0:
    return float('nan')
  rank_sum = average_ranks(scores)[is_positive].sum()
  return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def aupr(scores, is_positive) -> float:
  """Average precision, AP = sum_k (R_k - R_{k-1}) P_k, as sklearn's average_precision_score.

  Thresholds are the distinct scores in decreasing order (ties form one step); P_k and
  R_k are the precision and recall of predicting "positive" for score >= threshold k.
  `scores` [n], `is_positive` [n] bool. Returns nan when only one class is present.
  """
  scores, is_positive = _binary_scores(scores, is_positive)
  n_pos = int(is_positive.sum())
  if n_pos == 0 or n_pos == len(is_positive):
    return float('nan')
  order = np.argsort(-scores, kind='stable')
  s, pos = scores[order], is_positive[order]
  last_of_tie = np.append(s[1:] != s[:-1], True)
  tp = np.cumsum(pos)[last_of_tie]
  predicted = np.flatnonzero(last_of_tie) + 1
  precision = tp / predicted
  recall = tp / n_pos
  return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def retention_curve(uncertainty, correct, fractions) -> tuple[np.ndarray, float]:
  """Accuracy on the most certain examples as a function of the fraction retained.

  `uncertainty` [n], `correct` [n] bool, `fractions` [f] increasing in (0, 1]. For each
  fraction r, keep the k = max(1, round(r * n)) examples with the lowest uncertainty
  (stable sort: ties keep input order) and report their accuracy. Returns
  (accuracy [f], area), the area being the trapezoid integral of accuracy over `fractions`.
  """
  uncertainty = _as_array('uncertainty', uncertainty, 1, np.float64)
  correct = _as_array('correct', correct, 1).astype(np.float64)
  fractions = _as_array('fractions', fractions, 1, np.float64)
  n = _check_same_length(uncertainty=uncertainty, correct=correct)
  if n == 0 or fractions.size == 0:
    raise ValueError(f'Need at least one example and one fraction, got uncertainty '
                     f'{uncertainty.shape}, fractions {fractions.shape}.')
  if np.any(fractions <= 0) or np.any(fractions > 1) or np.any(np.diff(fractions) <= 0):
    raise ValueError(f'fractions must be increasing in (0, 1], got {fractions}.')
  hits = np.cumsum(correct[np.argsort(uncertainty, kind='stable')])
  kept = np.maximum(1, np.round(fractions * n).astype(int))
  acc = hits[kept - 1] / kept
  return acc, float(np.trapezoid(acc, fractions))


# ----------------------------------------------------------------- attention quality


def _maps_and_targets(maps, targets) -> tuple[np.ndarray, np.ndarray]:
  maps = _as_array('maps', maps, 3, np.float64)
  targets = _as_array('targets', targets, 3, np.float64)
  _check_same_shape(maps=maps, targets=targets)
  return maps.reshape(len(maps), -1), targets.reshape(len(targets), -1)


def spearman_per_example(maps, targets) -> np.ndarray:
  """Spearman rank correlation of each map with its ground-truth map, [n].

  `maps`, `targets`: [n, h, w] on the same grid. Each pair is flattened, ranked with
  average ranks for ties, and the Pearson correlation of the ranks is taken. An example
  whose map or target is constant gets nan (no warning).
  """
  maps, targets = _maps_and_targets(maps, targets)
  a = average_ranks(maps)
  b = average_ranks(targets)
  a -= a.mean(axis=1, keepdims=True)
  b -= b.mean(axis=1, keepdims=True)
  denom = np.sqrt(np.sum(a * a, axis=1) * np.sum(b * b, axis=1))
  with np.errstate(invalid='ignore', divide='ignore'):
    rho = np.sum(a * b, axis=1) / denom
  return np.where(denom > 0, rho, np.nan)


def mean_ignoring_nan(values) -> float:
  """Mean over the non-nan entries of `values` (any shape); nan if there are none."""
  values = np.asarray(values, np.float64)
  finite = ~np.isnan(values)
  return float(values[finite].mean()) if finite.any() else float('nan')


def pointing_game(maps, targets) -> np.ndarray:
  """Pointing-game hits, [n] bool: targets > 0 at the map's argmax cell.

  `maps`, `targets`: [n, h, w]. Ties for the maximum go to the first cell in row-major order.
  """
  maps, targets = _maps_and_targets(maps, targets)
  peak = np.argmax(maps, axis=1)
  return targets[np.arange(len(maps)), peak] > 0


POINTING_MASS = 0.15  # The share of a dense ground truth's mass that its "top cells" hold.


def top_mass_cells(targets, mass: float = POINTING_MASS) -> np.ndarray:
  """The top cells of each ground-truth map, [n, h, w] bool: the fewest highest cells whose
  values sum to at least `mass` of the map's total, and every cell tied with the last of them.
  A map that is 0 everywhere has none. On a binary mask this is the whole mask."""
  targets = _as_array('targets', targets, 3, np.float64)
  if not 0 < mass <= 1:
    raise ValueError(f'mass must be in (0, 1], got {mass}.')
  flat = targets.reshape(len(targets), -1)
  ordered = -np.sort(-flat, axis=1)
  reach = np.cumsum(ordered, axis=1) >= mass * ordered.sum(axis=1, keepdims=True) * (1 - 1e-12)
  threshold = ordered[np.arange(len(flat)), reach.argmax(axis=1)]
  return ((flat >= threshold[:, None]) & (flat > 0)).reshape(targets.shape)


def pointing_game_top_mass(maps, targets, mass: float = POINTING_MASS):
  """The pointing game against a dense ground truth (e.g. human attention, non-zero almost
  everywhere, where `pointing_game` hits for any map): (hits [n] bool, chance [n]).

  A hit: the map's argmax cell (ties: first in row-major order) is one of the target's
  `top_mass_cells`. chance: the share of cells that are, the hit rate of a peak drawn uniformly
  at random, which a random map scores on average.
  """
  maps, flat = _maps_and_targets(maps, targets)
  top = top_mass_cells(targets, mass).reshape(len(flat), -1)
  hits = top[np.arange(len(maps)), np.argmax(maps, axis=1)]
  return hits, top.mean(axis=1)


# ----------------------------------------------------------------------- faithfulness


def _pixel_order(maps: np.ndarray, height: int, width: int) -> np.ndarray:
  """Rank of each pixel in saliency order, [n, height, width] ints in [0, height * width).

  Cells are ranked by map value (descending, ties by row-major cell index); the pixels
  of a cell are consecutive in that order, in row-major order inside the cell.
  """
  n, h, w = maps.shape
  if height % h or width % w:
    raise ValueError(f'Image size ({height}, {width}) must be a multiple of the map grid '
                     f'({h}, {w}) for nearest upsampling; got maps {maps.shape}.')
  sh, sw = height // h, width // w
  cell_order = np.argsort(-maps.reshape(n, -1), axis=1, kind='stable')
  cell_rank = np.empty_like(cell_order)
  np.put_along_axis(cell_rank, cell_order, np.arange(h * w)[None], axis=1)
  cell_rank = cell_rank.reshape(n, h, 1, w, 1)
  within = (np.arange(sh)[:, None] * sw + np.arange(sw)[None, :]).reshape(1, 1, sh, 1, sw)
  return (cell_rank * (sh * sw) + within).reshape(n, height, width)


def deletion_insertion_auc(score_fn: Callable[[np.ndarray], np.ndarray], images, maps,
                           steps: int, baseline=None) -> tuple[np.ndarray, np.ndarray]:
  """Deletion and insertion AUC of saliency maps (Petsiuk et al. 2018, RISE).

  `images` [n, H, W, C]; `maps` [n, h, w] with H, W multiples of h, w (nearest upsampling);
  `score_fn(batch [n, H, W, C]) -> [n]` scores, e.g. the model's probability of its
  original answer; `baseline` broadcastable to `images` (default zeros).
  At step i = 0..steps the k_i = round(i * H * W / steps) most salient pixels (order of
  `_pixel_order`, all channels) are replaced by the baseline (deletion) or are the only
  ones taken from the image on top of the baseline (insertion). Each AUC is the trapezoid
  integral of the score over the fraction k_i / (H * W) in [0, 1]: low deletion and high
  insertion AUC mean a faithful map. Calls score_fn 2 * (steps + 1) times on n images.
  Returns (deletion_auc [n], insertion_auc [n]).
  """
  images = _as_array('images', images, 4)
  maps = _as_array('maps', maps, 3, np.float64)
  n, height, width, _ = images.shape
  _check_same_length(images=images, maps=maps)
  if steps < 1:
    raise ValueError(f'steps must be >= 1, got {steps}.')
  base = np.zeros_like(images) if baseline is None else np.asarray(baseline, images.dtype)
  try:
    base = np.broadcast_to(base, images.shape)
  except ValueError:
    raise ValueError(f'baseline of shape {base.shape} does not broadcast to images '
                     f'{images.shape}.') from None
  rank = _pixel_order(maps, height, width)[..., None]  # [n, H, W, 1]
  num_pixels = height * width
  kept = np.round(np.arange(steps + 1) * num_pixels / steps).astype(int)

  def scores_of(batch):
    out = np.asarray(score_fn(batch), np.float64)
    if out.shape != (n,):
      raise ValueError(f'score_fn must return shape ({n},), got {out.shape}.')
    return out

  deletion = np.stack([scores_of(np.where(rank < k, base, images)) for k in kept], axis=1)
  insertion = np.stack([scores_of(np.where(rank < k, images, base)) for k in kept], axis=1)
  x = kept / num_pixels
  return np.trapezoid(deletion, x, axis=1), np.trapezoid(insertion, x, axis=1)
