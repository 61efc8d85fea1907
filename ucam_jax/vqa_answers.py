"""VQA answers: the official normalisation, the top-K answer vocabulary, soft targets, accuracy.

The normalisation is that of the official evaluation script, `vqaEval.py` in
github.com/GT-Vision-Lab/VQA (PythonEvaluationTools/vqaEvaluation, master), quirks included, so
that accuracies computed here equal the official ones. What the official script does:
- a *predicted* answer: newlines and tabs -> spaces, strip, `process_punctuation`, then
  `process_digit_article` (lower case, number words -> digits, articles dropped, contractions);
- the 10 *human* answers of a question: `process_punctuation` only, and only when they are not
  all identical (`ground_truth_answers`). The released annotations are already normalised, so
  in practice both sides agree; where they do not, the official score is what we reproduce.
Then acc = (1/10) sum_j min(#{other annotators' answers == prediction} / 3, 1), which is
`metrics.vqa_accuracy`.
"""

import collections
import dataclasses
import functools
import json
import re
from collections.abc import Iterable, Sequence

import numpy as np

from ucam_jax import metrics

# Copied verbatim from vqaEval.py. Keys with capitals ("Im", "Ive", "Id've") never match, since
# the words are lower-cased first, and "somebody'd" maps to "somebodyd"; both as published.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4',
                'five': '5', 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
ARTICLES = ('a', 'an', 'the')
# Apostrophes, colons and periods are not in the list: "child's", "2:30" and "1.5" survive.
PUNCTUATION = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<',
               '@', '`', ',', '?', '!')
# As published: "(?!<=\d)" is a look-ahead (always true before a period), not a look-behind, so
# every period that is not followed by a digit goes: "1.5" stays, "dog." and "1." lose theirs.
PERIOD_STRIP = re.compile(r'(?!<=\d)(\.)(?!\d)')
COMMA_STRIP = re.compile(r'(\d)(,)(\d)')
# vqaEval.py passes re.UNICODE (= 32) as the positional `count` of `sub`: at most 32 periods go.
_PERIOD_STRIP_COUNT = int(re.UNICODE)

ANSWER_TYPES = ('yes/no', 'number', 'other')


def process_punctuation(text: str) -> str:
  """vqaEval.processPunctuation: punctuation -> space, or -> nothing where it touches a space or
  the text has a digit-comma-digit ("10,000" -> "10000", "red, blue" -> "red blue")."""
  out = text
  for p in PUNCTUATION:
    if p + ' ' in text or ' ' + p in text or COMMA_STRIP.search(text) is not None:
      out = out.replace(p, '')
    else:
      out = out.replace(p, ' ')
  return PERIOD_STRIP.sub('', out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
  """vqaEval.processDigitArticle: lower case, number words -> digits, articles dropped,
  missing apostrophes restored ("dont" -> "don't"); words re-joined by single spaces."""
  words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
  words = [word for word in words if word not in ARTICLES]
  return ' '.join(CONTRACTIONS.get(word, word) for word in words)


# Memoised: a vocabulary is built from millions of human answers, most of them repeats.
@functools.lru_cache(maxsize=1 << 16)
def normalize_answer(answer: str) -> str:
  """The official processing of a predicted answer ("Two" -> "2", "the dog." -> "dog")."""
  answer = answer.replace('\n', ' ').replace('\t', ' ').strip()
  return process_digit_article(process_punctuation(answer))


def ground_truth_answers(answers: Sequence[str]) -> list[str]:
  """The official processing of one question's human answers: `process_punctuation` on each,
  only when they are not all identical (unanimous answers are compared as they are)."""
  if len(set(answers)) > 1:
    return [process_punctuation(a) for a in answers]
  return list(answers)


# ------------------------------------------------------------------------- accuracy


@dataclasses.dataclass(frozen=True)
class VqaAccuracy:
  """Official VQA accuracy in [0, 1] (the official script reports 100x, rounded to 2 places).

  per_question: [n]. overall: mean of per_question. per_answer_type: mean over the questions of
  each answer type ('yes/no', 'number', 'other'; only types present). per_question_type: the
  same per question type ("what color is the", ...), empty when none were given.
  """
  per_question: np.ndarray
  overall: float
  per_answer_type: dict[str, float]
  per_question_type: dict[str, float]


def _mean_by(values: np.ndarray, groups: Sequence[str]) -> dict[str, float]:
  by = collections.defaultdict(list)
  for value, group in zip(values, groups):
    by[group].append(value)
  return {group: float(np.mean(v)) for group, v in sorted(by.items())}


def official_accuracy(pred_answers: Sequence[str], human_answers: Sequence[Sequence[str]],
                      answer_types: Sequence[str],
                      question_types: Sequence[str] | None = None) -> VqaAccuracy:
  """The official VQA accuracy of predicted answer strings, overall and per answer type.

  Args:
    pred_answers: [n] predicted answers, raw (normalised here with `normalize_answer`).
    human_answers: [n] lists of the human answers (10 in VQA), raw or as stored by the `vqa`
      builder (`ground_truth_answers` is applied here; it is idempotent).
    answer_types: [n] 'yes/no', 'number' or 'other'.
    question_types: optional [n] question types for the per-question-type breakdown.
  """
  lengths = {'pred_answers': len(pred_answers), 'human_answers': len(human_answers),
             'answer_types': len(answer_types)}
  if question_types is not None:
    lengths['question_types'] = len(question_types)
  if len(set(lengths.values())) != 1:
    raise ValueError(f'Mismatched lengths: {lengths}.')
  per_question = metrics.vqa_accuracy(
      [normalize_answer(p) for p in pred_answers],
      [ground_truth_answers(list(h)) for h in human_answers])
  overall = float(per_question.mean()) if len(per_question) else float('nan')
  return VqaAccuracy(
      per_question=per_question, overall=overall,
      per_answer_type=_mean_by(per_question, answer_types),
      per_question_type=_mean_by(per_question, question_types) if question_types else {})


# ---------------------------------------------------------------- answer vocabulary


@dataclasses.dataclass(frozen=True)
class AnswerVocabulary:
  """The K most frequent normalised human answers of the training split, in id order.

  Every entry is a `normalize_answer` output, so predicting entry k and scoring it with
  `official_accuracy` gives exactly the 'vqa' target of entry k.
  """
  answers: tuple[str, ...]

  @classmethod
  def build(cls, human_answers: Iterable[Sequence[str]], size: int) -> 'AnswerVocabulary':
    """Counts every human answer (all 10 per question, normalised); the empty answer (e.g.
    "a") is left out. Ties in count are broken by the answer string, so the result depends
    only on the multiset of answers, never on their order."""
    if size < 1:
      raise ValueError(f'The answer vocabulary size must be >= 1, got {size}.')
    counts = collections.Counter(normalize_answer(a) for answers in human_answers
                                 for a in answers)
    counts.pop('', None)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return cls(tuple(answer for answer, _ in ranked[:size]))

  @property
  def size(self) -> int:
    return len(self.answers)

  @functools.cached_property
  def _index(self) -> dict[str, int]:
    return {answer: i for i, answer in enumerate(self.answers)}

  def index(self, answer: str) -> int:
    """Id of the normalised `answer`, or -1 when it is outside the vocabulary."""
    return self._index.get(normalize_answer(answer), -1)

  def targets(self, human_answers: Sequence[str], kind: str = 'count') -> np.ndarray:
    """Soft targets of one question, [K] float32, from its human answers (raw or as stored).

    kind='count': count_k / n_answers, the fraction of annotators whose answer is entry k
      (SPEC section 4: the soft targets t of the aleatoric loss). Sums to 1 minus the share of
      answers outside the vocabulary.
    kind='vqa': the official accuracy of predicting entry k, mean_j min(m_{-j} / 3, 1), i.e.
      0, 0.3, 0.6, 0.9, 1 for m = 0, 1, 2, 3, >= 4 of 10 matches (the usual VQA BCE target).
    Matches are counted against `ground_truth_answers(human_answers)`, as the official script
    compares them, so both kinds are consistent with `official_accuracy`.
    """
    if kind not in ('count', 'vqa'):
      raise ValueError(f"kind must be 'count' or 'vqa', got {kind!r}.")
    if isinstance(human_answers, str) or len(human_answers) == 0:
      raise ValueError(f'human_answers must be a non-empty list of strings, got '
                       f'{human_answers!r}.')
    answers = ground_truth_answers(list(human_answers))
    out = np.zeros(self.size, np.float32)
    for answer, count in collections.Counter(answers).items():
      k = self._index.get(answer)
      if k is None:
        continue
      out[k] = (count / len(answers) if kind == 'count'
                else metrics.vqa_accuracy([answer], [answers])[0])
    return out

  def batch_targets(self, human_answers: Sequence[Sequence[str]],
                    kind: str = 'count') -> np.ndarray:
    """`targets` of each of n questions, [n, K] float32."""
    out = np.zeros((len(human_answers), self.size), np.float32)
    for i, answers in enumerate(human_answers):
      out[i] = self.targets(answers, kind)
    return out

  def save(self, path: str) -> None:
    with open(path, 'w') as f:
      json.dump({'answers': self.answers}, f, indent=0)

  @classmethod
  def load(cls, path: str) -> 'AnswerVocabulary':
    with open(path) as f:
      data = json.load(f)
    if 'answers' not in data:
      raise ValueError(f'{path} is not a ucam_jax answer vocabulary (no "answers" key).')
    return cls(tuple(data['answers']))
