"""The jailbreak detector's learned scorer: logistic regression over word unigrams and bigrams,
character n-grams of words and a few structural signals of the normalised text.

The weights are package data (data/detector_model.json), rebuilt from pinned public sources by
tools/train_detector.py; they are read once, on first use, by the `LearnedScorer` that owns
them. Inference is pure Python and linear in the text: each token contributes the weight of its
word, of its character n-grams (summed once per distinct word and kept in a bounded cache) and
of the bigram it closes; a text longer than one window is scored window by window (prefix sums)
and its best window counts, so an injection buried in a long document is not diluted by it."""

import collections
import importlib.resources
import itertools
import json
import math
import operator
import re
import threading
from dataclasses import dataclass

MODEL_RESOURCE = "detector_model.json"

WINDOW = 64                        # tokens scored together in a long text
STRIDE = 32                        # tokens between the starts of two windows
CHAR_NGRAMS = (3, 4)               # character n-gram sizes, taken inside "<word>"
MAX_TOKENS = 8192                  # tokens scored per text (bounded work on hostile input)
_WORD_CACHE_SIZE = 65536           # distinct words whose summed weights are kept

# Tokens: runs of anything but white space and ASCII punctuation, and each ASCII punctuation mark.
_TOKEN_RE = re.compile(r"[^\s!-/:-@\[-`{-~]+|[!-/:-@\[-`{-~]")
_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")

# Structural signals, each scaled to about [0, 1]; counted with C-level passes (str.count,
# set membership over the tokens) so that they cost little next to the n-grams.
_ROLE_MARKERS = ("<|", "|>", "[inst]", "[/inst]", "<<sys>>", "[system]", "system:", "assistant:", "user:", "human:",
                 "###", "developer:", "admin:")
_ROLE_RE = re.compile("|".join(map(re.escape, _ROLE_MARKERS)))
_IMPERATIVES = ("ignore forget disregard pretend act imagine respond reply answer print say output repeat reveal tell "
                "write stop do don never always must obey comply bypass override").split()
_AI_WORDS = "ai llm chatgpt gpt assistant model chatbot claude bot dan gemini copilot agent".split()
_YOU_WORDS = "you your yours yourself".split()
# What each counted token is, so that one C-level pass (Counter over a map) counts them all.
_TOKEN_KIND = {**dict.fromkeys(_PUNCT, "punct"), **dict.fromkeys(_IMPERATIVES, "imperative"),
               **dict.fromkeys(_AI_WORDS, "ai"), **dict.fromkeys(_YOU_WORDS, "you")}
_CAMEL_RE = re.compile(r"[a-z][A-Z][a-z]")
_UPPER_RE = re.compile(r"[A-Z]")
_SCRIPTS = (("latin_ext", re.compile(r"[\u00c0-\u024f]")), ("cyrillic", re.compile(r"[\u0400-\u04ff]")),
            ("cjk", re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")), ("arabic", re.compile(r"[\u0600-\u06ff]")),
            ("indic", re.compile(r"[\u0900-\u0dff]")), ("greek", re.compile(r"[\u0370-\u03ff]")))


def tokens(lower: str) -> list[str]:
    """Word tokens (with any non-ASCII punctuation they carry) and single ASCII punctuation
    marks of lower-cased normalised text."""
    return _TOKEN_RE.findall(lower)[:MAX_TOKENS]


def char_ngrams(word: str) -> list[str]:
    """Character n-grams of one word with its boundaries marked ("<ig", "ign"...)."""
    w = f"<{word}>"
    return [w[i:i + n] for n in CHAR_NGRAMS for i in range(len(w) - n + 1)]


def structure(text: str, lower: str, toks: list[str]) -> dict[str, float]:
    """Structural signals of a whole text: role markers, imperative density, address to an AI
    reader, character statistics of adversarial suffixes, and script mix."""
    n = max(1, len(toks))
    chars = max(1, len(text))
    kinds = collections.Counter(map(_TOKEN_KIND.get, toks))
    punct = kinds["punct"]
    nw = max(1, n - punct)
    spaces = lower.count(" ") + lower.count("\n")
    out = {
        "roles": min(1.0, len(_ROLE_RE.findall(lower)) / 3),
        "imperative": min(1.0, kinds["imperative"] * 8 / nw),
        "ai": min(1.0, kinds["ai"] * 10 / nw),
        "you": min(1.0, kinds["you"] * 8 / nw),
        "punct_tokens": punct / n,
        "camel": min(1.0, len(_CAMEL_RE.findall(text)) * 20 / n),
        "upper": len(_UPPER_RE.findall(text)) / chars,
        "word_length": min(1.0, max(0, len(lower) - spaces - punct) / nw / 12),
        "length": min(1.0, math.log1p(len(text)) / 10),
    }
    if not text.isascii():
        letters = max(1, len(text) - text.count(" "))
        present = 0
        for name, rx in _SCRIPTS:
            share = len(rx.findall(text)) / letters
            out["script_" + name] = min(1.0, share)
            present += share > 0.02
        out["script_mix"] = min(1.0, present / 2)
    return out


def features(text: str, lower: str, toks: list[str], lo: int, hi: int, struct: dict[str, float]) -> dict[str, float]:
    """The sparse feature vector of tokens [lo, hi) of a text (training's view of one window):
    counts divided by the square root of the window's length, plus the text's structure."""
    counts: dict[str, float] = {}
    prev = toks[lo - 1] if lo > 0 else "^"
    for t in toks[lo:hi]:
        for key in ["w:" + t, "b:" + prev + " " + t, *("c:" + g for g in char_ngrams(t))]:
            counts[key] = counts.get(key, 0.0) + 1.0
        prev = t
    scale = 1.0 / math.sqrt(max(1, hi - lo))
    out = {k: v * scale for k, v in counts.items()}
    out.update(("s:" + k, v) for k, v in struct.items())
    return out


def windows(n: int) -> list[tuple[int, int]]:
    """Token ranges scored in a text of n tokens: the whole text, and windows when it is longer
    than one."""
    spans = [(0, n)]
    if n > WINDOW:
        spans += [(s, min(n, s + WINDOW)) for s in range(0, n - STRIDE, STRIDE)]
    return spans


@dataclass(frozen=True, slots=True)
class Calibration:
    """Where the learned probability starts adding to the heuristic score (`low`) and where it
    flags a text on its own (`high`), both chosen on the training data's leave-one-source-out
    predictions."""
    low: float
    high: float

    def component(self, p: float) -> float:
        """The learned part of the jailbreak score: 0 below `low`, 1.0 (a flag) from `high`."""
        if p <= self.low:
            return 0.0
        return min(1.0, (p - self.low) / max(1e-9, self.high - self.low))


class LearnedScorer:
    """The learned model, read from package data on first use and kept: weights, calibration and
    a bounded cache of per-word weight sums (the cost of a text is mostly its new words)."""

    def __init__(self, model: dict | None = None):
        self._model = model
        self._lock = threading.Lock()
        self._weights: dict[str, float] | None = None
        self._bias = 0.0
        self._calibration = Calibration(1.0, 1.0)
        self._words: dict[str, float] = {}
        self._bigrams: dict[str, float] = {}
        self._struct: dict[str, float] = {}

    def _load(self) -> dict[str, float]:
        with self._lock:
            if self._weights is None:
                model = self._model
                if model is None:
                    raw = importlib.resources.files(__package__).joinpath("data").joinpath(MODEL_RESOURCE).read_text("utf-8")
                    model = json.loads(raw)
                self._bias = float(model["bias"])
                self._calibration = Calibration(float(model["calibration"]["low"]), float(model["calibration"]["high"]))
                weights = {k: float(v) for k, v in model["weights"].items()}
                self._bigrams = {k[2:]: v for k, v in weights.items() if k.startswith("b:")}
                self._struct = {k[2:]: v for k, v in weights.items() if k.startswith("s:")}
                self._weights = weights
            return self._weights

    @property
    def calibration(self) -> Calibration:
        self._load()
        return self._calibration

    @staticmethod
    def _word(w: dict[str, float], t: str) -> float:
        """The summed weights of a word and of its character n-grams."""
        return w.get("w:" + t, 0.0) + sum(w.get("c:" + g, 0.0) for g in char_ngrams(t))

    def probability(self, text: str, lower: str) -> float:
        """The model's probability that a (normalised) text is a prompt injection."""
        w = self._load()
        toks = tokens(lower)
        if not toks:
            return 0.0
        struct = self._struct
        base = self._bias + sum(struct.get(k, 0.0) * v for k, v in structure(text, lower, toks).items())
        words = self._words
        missing = set(toks).difference(words)
        if len(words) + len(missing) > _WORD_CACHE_SIZE:
            words.clear()
            missing = set(toks)
        for t in missing:
            words[t] = self._word(w, t)
        # Per token: its word's weights plus the bigram it closes, summed in C-level passes.
        unigrams = map(words.__getitem__, toks)
        bigrams = map(self._bigrams.get, map(" ".join, zip(itertools.chain(("^",), toks), toks)), itertools.repeat(0.0))
        n = len(toks)
        if n <= WINDOW:
            best = base + sum(map(operator.add, unigrams, bigrams)) / math.sqrt(n)
        else:
            prefix = list(itertools.accumulate(map(operator.add, unigrams, bigrams), initial=0.0))
            best = max(base + (prefix[hi] - prefix[lo]) / math.sqrt(hi - lo) for lo, hi in windows(n))
        return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, best))))

    def component(self, text: str, lower: str) -> float:
        """The learned part of the jailbreak score (see Calibration)."""
        return self.calibration.component(self.probability(text, lower))
