"""The jailbreak detector's learned scorer: logistic regression over word unigrams and bigrams,
character n-grams of words and a few structural signals of the normalised text.

The weights are package data (data/detector_model.json), rebuilt from pinned public sources by
tools/train_detector.py; they are read once, on first use, by the `LearnedScorer` that owns
them. Inference is pure Python and linear in the text: each token contributes the weight of its
word, of its character n-grams (summed once per distinct word and kept in a bounded cache) and
of the bigram it closes; a text longer than one window is scored window by window (prefix sums)
and its best window counts, so an injection buried in a long document is not diluted by it."""

import importlib.resources
import json
import math
import re
import threading
from dataclasses import dataclass

MODEL_RESOURCE = "detector_model.json"

WINDOW = 64                        # tokens scored together in a long text
STRIDE = 32                        # tokens between the starts of two windows
CHAR_NGRAMS = (3, 4)               # character n-gram sizes, taken inside "<word>"
MAX_TOKENS = 8192                  # tokens scored per text (bounded work on hostile input)
_WORD_CACHE_SIZE = 65536           # distinct words whose summed weights are kept

_TOKEN_RE = re.compile(r"[^\W_]+|[^\w\s]+")

# Structural signals, each scaled to about [0, 1].
_ROLE_RE = re.compile(r"<\|[a-z_]+\|>|\[/?(?:inst|system|sys)\]|<</?sys>>|^\s*#{2,}\s*\w+|^\s*(?:system|assistant"
                      r"|user|human|ai|developer|admin)\s*:", re.M)
_IMPERATIVE_RE = re.compile(
    r"(?:^|[.!?:\n]\s*)(?:please\s+)?(?:ignore|forget|disregard|pretend|act|imagine|respond|reply|answer|print|say"
    r"|output|repeat|reveal|tell|write|stop|do|don't|never|always|you\s+(?:must|will|are|shall))\b", re.M)
_AI_RE = re.compile(r"\b(?:ai|llm|chatgpt|gpt|assistant|language\s+model|chatbot|model|claude|bot)\b")
_YOU_RE = re.compile(r"\byou(?:r|rs|rself)?\b")
_CAMEL_RE = re.compile(r"[a-z][A-Z][a-z]")
_PUNCT_RUN_RE = re.compile(r"[^\w\s]{3,}")
_SCRIPTS = (("latin_ext", re.compile(r"[\u00c0-\u024f]")), ("cyrillic", re.compile(r"[\u0400-\u04ff]")),
            ("cjk", re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")), ("arabic", re.compile(r"[\u0600-\u06ff]")),
            ("indic", re.compile(r"[\u0900-\u0dff]")), ("greek", re.compile(r"[\u0370-\u03ff]")))


def tokens(lower: str) -> list[str]:
    """Word and punctuation-run tokens of lower-cased normalised text."""
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
    words = [t for t in toks if t[0].isalnum()]
    nw = max(1, len(words))
    out = {
        "roles": min(1.0, len(_ROLE_RE.findall(lower)) / 3),
        "imperative": min(1.0, len(_IMPERATIVE_RE.findall(lower)) * 8 / nw),
        "ai": min(1.0, len(_AI_RE.findall(lower)) * 10 / nw),
        "you": min(1.0, len(_YOU_RE.findall(lower)) * 8 / nw),
        "punct_tokens": (n - len(words)) / n,
        "punct_runs": min(1.0, len(_PUNCT_RUN_RE.findall(text)) * 20 / n),
        "camel": min(1.0, len(_CAMEL_RE.findall(text)) * 20 / n),
        "upper": sum(1 for c in text if c.isupper()) / chars if len(text) < 4096 else 0.0,
        "long_words": sum(1 for w in words if len(w) > 14) / nw,
        "length": min(1.0, math.log1p(len(text)) / 10),
    }
    if not text.isascii():
        letters = max(1, sum(1 for t in words for _ in t) if len(words) < 2048 else chars)
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

    def _load(self) -> dict[str, float]:
        with self._lock:
            if self._weights is None:
                model = self._model
                if model is None:
                    raw = importlib.resources.files(__package__).joinpath("data").joinpath(MODEL_RESOURCE).read_text("utf-8")
                    model = json.loads(raw)
                self._bias = float(model["bias"])
                self._calibration = Calibration(float(model["calibration"]["low"]), float(model["calibration"]["high"]))
                self._weights = {k: float(v) for k, v in model["weights"].items()}
            return self._weights

    @property
    def calibration(self) -> Calibration:
        self._load()
        return self._calibration

    def _word(self, w: dict[str, float], t: str) -> float:
        s = self._words.get(t)
        if s is None:
            s = w.get("w:" + t, 0.0)
            for g in char_ngrams(t):
                s += w.get("c:" + g, 0.0)
            if len(self._words) >= _WORD_CACHE_SIZE:
                self._words.clear()
            self._words[t] = s
        return s

    def probability(self, text: str, lower: str) -> float:
        """The model's probability that a (normalised) text is a prompt injection."""
        w = self._load()
        toks = tokens(lower)
        if not toks:
            return 0.0
        base = self._bias
        for k, v in structure(text, lower, toks).items():
            base += w.get("s:" + k, 0.0) * v
        prefix = [0.0]
        acc, prev = 0.0, "^"
        for t in toks:
            acc += self._word(w, t) + w.get("b:" + prev + " " + t, 0.0)
            prefix.append(acc)
            prev = t
        best = max(base + (prefix[hi] - prefix[lo]) / math.sqrt(hi - lo) for lo, hi in windows(len(toks)))
        return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, best))))

    def component(self, text: str, lower: str) -> float:
        """The learned part of the jailbreak score (see Calibration)."""
        return self.calibration.component(self.probability(text, lower))
