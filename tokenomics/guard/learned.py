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

# Tokens: runs of anything but white space and ASCII punctuation, and each ASCII punctuation mark
# (the definition; tokens() finds the same faster, at the marks).
_TOKEN_RE = re.compile(r"[^\s!-/:-@\[-`{-~]+|[!-/:-@\[-`{-~]")
_PUNCT_SPLIT_RE = re.compile(r"([!-/:-@\[-`{-~])")
_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")

# Structural signals, each scaled to about [0, 1]; counted with C-level passes (str.count,
# set membership over the tokens) so that they cost little next to the n-grams.
_ROLE_MARKERS = ("<|", "|>", "[inst]", "[/inst]", "<<sys>>", "[system]", "system:", "assistant:", "user:", "human:",
                 "###", "developer:", "admin:")
# Counted as one findall of them all would count them: the word markers end at their only ":"
# and none ends another, so they never overlap each other or a mark marker and str.count finds
# each; the mark markers keep their regex (they can overlap: "<|>").
_ROLE_WORDS = tuple(m for m in _ROLE_MARKERS if m.endswith(":") and m[:-1].isalpha())
_ROLE_MARKS_RE = re.compile("|".join(re.escape(m) for m in _ROLE_MARKERS if m not in _ROLE_WORDS))
_IMPERATIVES = ("ignore forget disregard pretend act imagine respond reply answer print say output repeat reveal tell "
                "write stop do don never always must obey comply bypass override").split()
_AI_WORDS = "ai llm chatgpt gpt assistant model chatbot claude bot dan gemini copilot agent".split()
_YOU_WORDS = "you your yours yourself".split()
# The extended signals (a model of format 2 and up): word classes whose co-occurrence marks an instruction addressed to the model: dismissing a
# prior instruction, claiming authority, switching mode, extracting or sending out what is
# hidden, hiding it from the user. In several languages; the weights are learned, the classes
# only pool words that play one part. Texts *about* attacks (classifiers, tests) have words of
# their own ("meta"), so that quoting an attack is not the same as making one.
_CUES = {
    "override": "ignore ignoring disregard forget bypass override overrule skip abandon drop discard nullify void "
                "ignoriere ignorieren vergiss missachte ignora ignorar olvida olvide ignorez ignorer oublie oubliez "
                "dimentica ignorare esqueça esqueca desconsidere unut игнорируй игнорировать забудь تجاهل انس "
                "نادیده".split(),
    "rules": "instructions instruction rules rule guidelines directives directive prompt policies policy restrictions "
             "filters constraints safeguards guardrails programming orders anweisungen regeln richtlinien "
             "instrucciones reglas consignes règles regles istruzioni regole instruções instrucoes regras "
             "talimatları talimatlar kuralları kurallar инструкции правила ограничения تعليمات القواعد دستورالعمل".split(),
    "prior": "previous prior above earlier preceding initial original former vorherigen vorherige obigen anteriores "
             "anterior précédentes precedentes précédent precedenti önceki yukarıdaki предыдущие прежние السابقة "
             "قبلی".split(),
    "authority": "developer developers administrator admin operator root sudo openai anthropic maintainer owner "
                 "superuser moderator creator engineer staff ceo entwickler administrador desarrollador "
                 "développeur développeurs administrateur sviluppatore geliştirici yönetici разработчик "
                 "администратор".split(),
    "mode": "mode jailbreak jailbroken unrestricted uncensored unfiltered unlimited unbound limitless dan debug "
            "maintenance god evil rogue amoral modus modo режим".split(),
    "secret": "system hidden secret confidential initial internal password passwords credentials key keys token "
              "tokens verbatim sistem системный системные".split(),
    "reveal": "reveal print repeat output show display disclose leak share dump recite echo paste list "
              "zeige wiederhole muestra repite révèle affiche répète mostra ripeti göster yaz покажи повтори выведи".split(),
    "exfil": "send forward email post upload http https url link webhook curl fetch transfer wire exfiltrate "
             "markdown image".split(),
    "conceal": "secretly silently quietly covertly unnoticed without mention hide conceal".split(),
    "you": "du dein deine tu tus usted vous votre ton ta sen senin ты твой вы ваш".split(),
    "meta": "classify classifier detect detection detector label labels dataset example examples benchmark evaluate "
            "evaluation judge grader score scoring research defend defense defence test tests testing red-team "
            "attacker attack attacks injection injections vulnerability".split(),
}
# What each counted token is, so that C-level passes (Counter over a map) count them all.
_TOKEN_KIND = {**dict.fromkeys(_PUNCT, "punct"), **dict.fromkeys(_IMPERATIVES, "imperative"),
               **dict.fromkeys(_AI_WORDS, "ai"), **dict.fromkeys(_YOU_WORDS, "you")}
_CUE_KIND = {w: c for c, ws in _CUES.items() for w in ws}
# Both at once, (kind, cue class), for one counting pass over a text's distinct tokens.
_TOKEN_CLASSES = {t: (_TOKEN_KIND.get(t), _CUE_KIND.get(t)) for t in {*_TOKEN_KIND, *_CUE_KIND}}
# Cue words of scripts written without spaces, counted as substrings.
_CJK_CUES = {"override": ("忽略", "无视", "忘记", "無視", "忘れ", "무시"), "rules": ("指令", "指示", "规则", "規則", "命令", "지시"),
             "prior": ("之前", "以前", "上面", "先前", "以前の", "이전"), "reveal": ("输出", "显示", "告诉", "表示", "출력"),
             "secret": ("系统", "系統", "システム", "秘密", "시스템")}
# Pairs of cue classes (and AI/you words) whose joint presence is a feature of its own.
_CUE_PAIRS = (("override", "rules"), ("override", "prior"), ("rules", "prior"), ("reveal", "secret"),
              ("authority", "override"), ("authority", "mode"), ("authority", "rules"), ("you", "mode"),
              ("ai", "conceal"), ("ai", "exfil"), ("exfil", "conceal"), ("you", "override"), ("ai", "override"),
              ("meta", "override"), ("meta", "rules"), ("reveal", "rules"))
_RARE_PUNCT = b"\\[]{}()*|^~`<>"
_ASCII_QUOTES, _QUOTES = b"\"'", ("\u201c", "\u201d", "\u00ab", "\u00bb")
_TAIL = 24                         # tokens at a text's end (where adversarial suffixes sit)
# ASCII characters counted in a text's UTF-8 bytes (multi-byte sequences hold no ASCII byte): the
# length a deleting bytes.translate takes away is their count, in one C pass.
_UPPER = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_CAMEL_AT_RE = re.compile(r"[A-Z](?<=[a-z][A-Z])[a-z](?:[A-Z][a-z])?")
_SCRIPTS = (("latin_ext", re.compile(r"[\u00c0-\u024f]")), ("cyrillic", re.compile(r"[\u0400-\u04ff]")),
            ("cjk", re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")), ("arabic", re.compile(r"[\u0600-\u06ff]")),
            ("indic", re.compile(r"[\u0900-\u0dff]")), ("greek", re.compile(r"[\u0370-\u03ff]")))


def tokens(lower: str) -> list[str]:
    """Word tokens (with any non-ASCII punctuation they carry) and single ASCII punctuation
    marks of lower-cased normalised text: _TOKEN_RE.findall, by a split at the marks and one at
    white space (str.split's white space is the same as the pattern's \\s)."""
    return " ".join(_PUNCT_SPLIT_RE.split(lower)).split()[:MAX_TOKENS]


def _ascii_count(raw: bytes, chars: bytes) -> int:
    """How many of the ASCII `chars` the UTF-8 bytes `raw` hold."""
    return len(raw) - len(raw.translate(None, chars))


def _camel_count(text: str) -> int:
    """len(re.findall(r"[a-z][A-Z][a-z]", text)), searched from the capitals (rare) rather than
    from every lower-case letter. Those matches do not overlap: after one at a capital, one at
    the capital two places on ("aBcDe") is not counted, so each match here takes that second
    hump along."""
    return len(_CAMEL_AT_RE.findall(text))


def char_ngrams(word: str) -> list[str]:
    """Character n-grams of one word with its boundaries marked ("<ig", "ign"...)."""
    w = f"<{word}>"
    return [w[i:i + n] for n in CHAR_NGRAMS for i in range(len(w) - n + 1)]


def structure(text: str, lower: str, toks: list[str], extended: bool = False,
              counts: collections.Counter | None = None) -> dict[str, float]:
    """Structural signals of a whole text: role markers, imperative density, address to an AI
    reader, character statistics of adversarial suffixes, and script mix; `extended` adds the
    cue classes and their pairs, and quote, bracket, line and tail statistics. `counts`:
    Counter(toks), when the caller has it."""
    n = max(1, len(toks))
    chars = max(1, len(text))
    counts = collections.Counter(toks) if counts is None else counts
    kinds, cues = collections.Counter(), collections.Counter()
    for t in counts.keys() & _TOKEN_CLASSES.keys():
        kind, cue = _TOKEN_CLASSES[t]
        kinds[kind] += counts[t]
        cues[cue] += counts[t]
    raw = text.encode("utf-8", "surrogatepass")
    punct = kinds["punct"]
    nw = max(1, n - punct)
    spaces = lower.count(" ") + lower.count("\n")
    out = {
        "roles": min(1.0, (sum(map(lower.count, _ROLE_WORDS)) + len(_ROLE_MARKS_RE.findall(lower))) / 3),
        "imperative": min(1.0, kinds["imperative"] * 8 / nw),
        "ai": min(1.0, kinds["ai"] * 10 / nw),
        "you": min(1.0, kinds["you"] * 8 / nw),
        "punct_tokens": punct / n,
        "camel": min(1.0, _camel_count(text) * 20 / n),
        "upper": _ascii_count(raw, _UPPER) / chars,
        "word_length": min(1.0, max(0, len(lower) - spaces - punct) / nw / 12),
        "length": min(1.0, math.log1p(len(text)) / 10),
    }
    if extended:
        out.update(_extended(text, raw, lower, toks, kinds, cues, n, nw, chars))
    if not text.isascii():
        letters = max(1, len(text) - text.count(" "))
        present = 0
        for name, rx in _SCRIPTS:
            share = len(rx.findall(text)) / letters
            out["script_" + name] = min(1.0, share)
            present += share > 0.02
        out["script_mix"] = min(1.0, present / 2)
    return out


def _extended(text: str, raw: bytes, lower: str, toks: list[str], kinds: collections.Counter,
              present: collections.Counter, n: int, nw: int, chars: int) -> dict[str, float]:
    tail = toks[-_TAIL:]
    tail_punct = sum(t in _PUNCT for t in tail) / len(tail)
    out = {
        "rare_punct": min(1.0, _ascii_count(raw, _RARE_PUNCT) * 10 / chars),
        "newlines": min(1.0, lower.count("\n") * 4 / n),
        "quotes": min(1.0, (_ascii_count(raw, _ASCII_QUOTES)
                            + (0 if text.isascii() else sum(map(text.count, _QUOTES)))) * 10 / n),
        "tail_punct": tail_punct,
        "tail_excess": max(0.0, tail_punct - kinds["punct"] / n),
    }
    present["ai"] = kinds["ai"]
    present["you"] += kinds["you"]
    if not text.isascii() and any(map(lower.__contains__, ("的", "の", "는", "指", "令", "系"))):
        for c, words in _CJK_CUES.items():
            present[c] += sum(map(lower.count, words))
    for c in _CUES:
        if present[c]:
            out["cue_" + c] = min(1.0, present[c] * 6 / nw)
    for a, b in _CUE_PAIRS:
        if present[a] and present[b]:
            out["pair_" + a + "_" + b] = 1.0
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
    predictions; the same two points for the structure-only model (`struct_low`,
    `struct_high`; 1.0 when there is none), whose part is at most `struct_weight` (below 1.0, it
    never flags a text alone: it needs a heuristic signal too). The larger part counts."""
    low: float
    high: float
    struct_low: float = 1.0
    struct_high: float = 1.0
    struct_weight: float = 1.0

    @staticmethod
    def _ramp(p: float, low: float, high: float) -> float:
        if p <= low:
            return 0.0
        return min(1.0, (p - low) / max(1e-9, high - low))

    def component(self, p: float, p_struct: float = 0.0) -> float:
        """The learned part of the jailbreak score: 0 below `low`, 1.0 (a flag) from `high`, and
        likewise, up to `struct_weight`, for the structure-only probability."""
        part = self._ramp(p, self.low, self.high)
        if p_struct > self.struct_low:
            part = max(part, self.struct_weight * self._ramp(p_struct, self.struct_low, self.struct_high))
        return part

    def flags(self, p: float, p_struct: float = 0.0) -> bool:
        """Whether the learned part alone flags a text."""
        return p >= self.high or (self.struct_weight >= 1.0 and p_struct >= self.struct_high)


_NOTHING_AFTER: dict[str, float] = {}   # the bigram weights after a token that starts none


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))


class LearnedScorer:
    """The learned model, read from package data on first use and kept: weights, calibration and
    a bounded cache of per-word weight sums (the cost of a text is mostly its new words). Beside
    the full model sits a second one over the structural signals alone: fewer, coarser features
    that carry over better to phrasings unlike the training sources."""

    def __init__(self, model: dict | None = None):
        self._model = model
        self._lock = threading.Lock()
        self._weights: dict[str, float] | None = None
        self._bias = 0.0
        self._calibration = Calibration(1.0, 1.0)
        self._words: dict[str, float] = {}
        self._after: dict[str, dict[str, float]] = {}   # bigram weights: previous token -> token -> weight
        self._struct: dict[str, float] = {}
        self._struct_only: dict[str, float] = {}
        self._struct_bias = 0.0
        self._extended = False

    def _load(self) -> dict[str, float]:
        with self._lock:
            if self._weights is None:
                model = self._model
                if model is None:
                    raw = importlib.resources.files(__package__).joinpath("data").joinpath(MODEL_RESOURCE).read_text("utf-8")
                    model = json.loads(raw)
                self._bias = float(model["bias"])
                self._extended = int(model.get("format", 1)) >= 2
                cal = model["calibration"]
                self._calibration = Calibration(float(cal["low"]), float(cal["high"]), float(cal.get("struct_low", 1.0)),
                                                float(cal.get("struct_high", 1.0)), float(cal.get("struct_weight", 1.0)))
                weights = {k: float(v) for k, v in model["weights"].items()}
                after: dict[str, dict[str, float]] = {}
                for k, v in weights.items():
                    if k.startswith("b:"):
                        prev, _, tok = k[2:].partition(" ")
                        after.setdefault(prev, {})[tok] = v
                self._after = after
                self._struct = {k[2:]: v for k, v in weights.items() if k.startswith("s:")}
                second = model.get("struct_model")
                if second:
                    self._struct_bias = float(second["bias"])
                    self._struct_only = {k[2:]: float(v) for k, v in second["weights"].items()}
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

    def probabilities(self, text: str, lower: str) -> tuple[float, float]:
        """The full model's and the structure-only model's probabilities that a (normalised)
        text is a prompt injection (the second is 0.0 without that model)."""
        w = self._load()
        toks = tokens(lower)
        if not toks:
            return 0.0, 0.0
        counts = collections.Counter(toks)
        signals = structure(text, lower, toks, self._extended, counts)
        struct = self._struct
        base = self._bias + sum(struct.get(k, 0.0) * v for k, v in signals.items())
        p_struct = 0.0
        if self._struct_only:
            only = self._struct_only
            p_struct = _sigmoid(self._struct_bias + sum(only.get(k, 0.0) * v for k, v in signals.items()))
        words = self._words
        missing = set(counts).difference(words)   # (keys() - keys() would walk the whole cache)
        if len(words) + len(missing) > _WORD_CACHE_SIZE:
            words.clear()
            missing = counts.keys()
        for t in missing:
            words[t] = self._word(w, t)
        # Per token: its word's weights plus the bigram it closes, summed in C-level passes.
        try:
            unigrams = list(map(words.__getitem__, toks))
        except KeyError:               # a scan in another thread emptied the shared cache meanwhile
            unigrams = [self._word(w, t) for t in toks]
        follows = map(self._after.get, itertools.chain(("^",), toks), itertools.repeat(_NOTHING_AFTER))
        bigrams = map(dict.get, follows, toks, itertools.repeat(0.0))
        n = len(toks)
        if n <= WINDOW:
            best = base + sum(map(operator.add, unigrams, bigrams)) / math.sqrt(n)
        else:
            prefix = list(itertools.accumulate(map(operator.add, unigrams, bigrams), initial=0.0))
            best = max(base + (prefix[hi] - prefix[lo]) / math.sqrt(hi - lo) for lo, hi in windows(n))
        return _sigmoid(best), p_struct

    def probability(self, text: str, lower: str) -> float:
        """The full model's probability that a (normalised) text is a prompt injection."""
        return self.probabilities(text, lower)[0]

    def component(self, text: str, lower: str) -> float:
        """The learned part of the jailbreak score (see Calibration)."""
        return self.calibration.component(*self.probabilities(text, lower))
