"""The jailbreak detector's learned scorer: a logistic regression over the words, word pairs and
word prefixes of the normalised text, a few structural measures of the text, and the heuristic
signal families of the lexicon, with its weights shipped as package data.

Why a learned layer at all: the lexicon's signals are precise and explain themselves, but they
only know the phrasings they were written from. Attacks in other words (goal hijacking, polite
prompt extraction, authority claims, notes to an AI hidden in a document, adversarial suffixes,
other languages) share vocabulary and shape with the attacks in public collections more than
with any phrase list; and system prompts that merely quote an attack share the phrases but not
the shape. The weights come from `tools/train_detector.py`, which rebuilds them from pinned
public data; nothing here downloads anything.

Inference is pure Python and linear in the text: features are found with a few regex passes
(C speed) and looked up in dicts; the dict lookup is the feature hash, so no separate hashing
pass is paid per n-gram. Long texts are scored in overlapping chunks and the highest chunk
counts, so an injection in a long document is not diluted by the benign text around it.
"""

import functools
import importlib.resources
import itertools
import json
import math
import re
from dataclasses import dataclass


WEIGHTS_RESOURCE = "data/jailbreak_model.json"   # inside tokenomics.guard


_CHUNK = 1536                      # chars scored as one text; most attacks (and the training
                                   # texts' first chunk) fit, a long document becomes several
_STEP = 1280                       # chars between chunk starts: 256 chars of overlap, so a
                                   # short injection cut by one chunk boundary is whole in the next
_MAX_CHUNKS = 64                   # per text (the detector hands at most a 33 KB segment)


_PREFIX = 5                        # letters of a word kept as its prefix feature ("instr~"),
                                   # which also matches inflections in other languages


# The heuristic layer's outputs the model reads (per-family scores, their total, and whether
# the text talks about prompt injection): the model learns when to trust them and when a
# system prompt or a classifier prompt only quotes an attack.
HEURISTIC_INPUTS = ("override", "persona", "developer_mode", "prompt_extraction", "filter_bypass", "role_injection",
                    "harmful_intent", "obfuscation", "correction", "total", "strong", "meta")


STRUCTURE_INPUTS = ("role_markers", "imperative", "second_person", "ai_nouns", "ai_reader", "symbols", "symbol_runs",
                    "odd_tokens", "long_tokens", "non_ascii", "non_latin", "scripts", "length")


DENSE_INPUTS = STRUCTURE_INPUTS + HEURISTIC_INPUTS


_WORD_RE = re.compile(r"\w+")


# Chat-template and role markers pasted into a message ("<|im_start|>system", "[INST]",
# "### Instruction:", "</system>", "Assistant:" at the start of a line).
_ROLE_RE = re.compile(
    r"<\|[a-z_ ]{2,20}\|>|\[/?\s*(?:inst|system|sys|admin|developer)\s*\]|<<\s*/?\s*sys\s*>>"
    r"|</?\s*(?:system|user|assistant|admin|developer|instructions?|human|im_start|im_end)\s*>"
    r"|(?:^|\n)\s*(?:system|user|assistant|human|ai|admin|developer|bot)\s*:"
    r"|#{2,}\s*(?:instruction|system|response|input|new|admin|override|developer|end)")


# First word of each sentence or line: imperative texts ("Ignore ... Print ... Do not ...")
# open sentences with verbs that ordinary questions rarely start with.
_OPENER_RE = re.compile(r"(?:^|[.!?\n:;]\s*)[\"'(\[*-]*\s*([a-z']+)")


_IMPERATIVES = frozenset(
    "ignore disregard forget override bypass print output reveal repeat say write tell show respond reply answer act "
    "pretend imagine become behave stop start do don't dont never always follow obey comply execute run send forward "
    "include append insert begin remember simulate roleplay play generate produce provide list give translate "
    "continue enable disable activate enter switch turn release unlock drop abandon skip return display describe "
    "explain make create use keep stay from".split())


_YOU_RE = re.compile(r"\b(?:you|your|yours|yourself|you're|youre|you've|you'll|u)\b")


_AI_RE = re.compile(r"\b(?:ai|assistant|chatgpt|gpt\w*|llm|llms|model|claude|gemini|bard|bot|chatbot|agent|copilot"
                    r"|language model|openai|anthropic)\b")


# A note to whoever (whatever) reads the text: "note to the AI", "if you are an AI reading this".
_AI_READER_RE = re.compile(
    r"\b(?:to|for|dear|hey|attention|attn)\s+(?:the\s+|any\s+|all\s+)?(?:ai|llm|assistant|agent|bot|model|chatbot"
    r"|language model)s?\b|\b(?:reading|processing|summari[sz]ing|parsing)\s+this\b")


_SYMBOL_RE = re.compile(r"[^\w\s]")


_SYMBOL_RUN_RE = re.compile(r"[^\w\s]{3,}")


# Adversarial suffixes are strings of odd tokens: case changes inside words, letters glued to
# digits or punctuation ("oppositeley.](Me", "SureBEtera").
_ODD_TOKEN_RE = re.compile(r"\b\w*[a-z][A-Z]\w*|\w+[^\w\s]+\w+[^\w\s]+\w*")


_LONG_TOKEN_RE = re.compile(r"\S{25,}")


_NON_ASCII_RE = re.compile(r"[^\x00-\x7f]")


# Scripts whose letters the model counts (after NFKC): Latin is the default; a text mixing
# scripts, or written wholly in another, is read by the word features less well.
_SCRIPT_RES = tuple(re.compile(p) for p in (
    r"[a-zA-Z\u00c0-\u024f]", r"[\u0370-\u03ff]", r"[\u0400-\u04ff]", r"[\u0590-\u05ff]", r"[\u0600-\u06ff]",
    r"[\u0900-\u097f]", r"[\u0e00-\u0e7f]", r"[\u3040-\u30ff]", r"[\u4e00-\u9fff]", r"[\uac00-\ud7af]"))


_CJK_RE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]")


def _clip(x: float, hi: float = 1.0) -> float:
    return x if x < hi else hi


def structure(norm: str, lower: str, words: list[str]) -> list[float]:
    """The structural measures of one chunk, in STRUCTURE_INPUTS order, each in [0, 1].
    `norm` keeps case (odd tokens need it), `lower` is its lower-case copy."""
    n = len(norm) or 1
    nw = len(words) or 1
    openers = _OPENER_RE.findall(lower)
    imperative = sum(w in _IMPERATIVES for w in openers) / len(openers) if openers else 0.0
    if norm.isascii():
        non_ascii = non_latin = 0.0
        scripts = 1.0 if words else 0.0
    else:
        counts = [len(rx.findall(norm)) for rx in _SCRIPT_RES]
        letters = sum(counts) or 1
        non_ascii = len(_NON_ASCII_RE.findall(norm)) / n
        non_latin = (letters - counts[0]) / letters if sum(counts) else 0.0
        scripts = sum(c > 0 for c in counts)
    return [
        _clip(len(_ROLE_RE.findall(lower)) / 3),
        imperative,
        _clip(len(_YOU_RE.findall(lower)) / nw * 5),
        _clip(len(_AI_RE.findall(lower)) / nw * 10),
        _clip(len(_AI_READER_RE.findall(lower)) / 2),
        _clip(len(_SYMBOL_RE.findall(norm)) / n * 4),
        _clip(len(_SYMBOL_RUN_RE.findall(norm)) / nw * 10),
        _clip(len(_ODD_TOKEN_RE.findall(norm)) / nw * 5),
        _clip(len(_LONG_TOKEN_RE.findall(norm)) / nw * 10),
        _clip(non_ascii * 2),
        non_latin,
        _clip((scripts - 1) / 2) if scripts > 1 else 0.0,
        _clip(math.log1p(len(norm)) / 8),
    ]


def grams(lower: str, words: list[str]) -> tuple[set[str], set[tuple[str, str]]]:
    """The sparse features of one chunk: words, word prefixes ("instr~") and, for CJK words
    (written without spaces), character pairs ("c:指令"); and the pairs of adjacent words. The
    first word is marked ("^you"): system prompts and attacks open differently."""
    single = set(words)
    single.update([w[:_PREFIX] + "~" for w in single if len(w) > _PREFIX])
    if words:
        single.add("^" + words[0])
        if not lower.isascii():
            for w in [w for w in single if _CJK_RE.search(w)]:
                single.update(["c:" + w[i:i + 2] for i in range(len(w) - 1)])
    return single, set(zip(words, words[1:]))


def chunks(norm: str) -> list[str]:
    """Overlapping pieces of at most _CHUNK chars covering the text (one piece if it is short)."""
    if len(norm) <= _CHUNK:
        return [norm]
    starts = range(0, len(norm) - _CHUNK + _STEP, _STEP)
    return [norm[s:s + _CHUNK] for s in itertools.islice(starts, _MAX_CHUNKS)]


@dataclass(frozen=True, slots=True)
class Features:
    """What the model reads of one chunk (the training tool builds its matrix from these)."""
    single: set
    pairs: set
    dense: list


def features(norm: str, heuristic: dict[str, float]) -> list[Features]:
    """The features of each chunk of a normalised text; `heuristic` maps HEURISTIC_INPUTS names
    to the lexicon's findings for the whole text (missing names count 0)."""
    h = [float(heuristic.get(name, 0.0)) for name in HEURISTIC_INPUTS]
    out = []
    for chunk in chunks(norm):
        chunk = " ".join(chunk.split()) if "  " in chunk or "\n" in chunk or "\t" in chunk else chunk
        lower = chunk.lower()
        words = _WORD_RE.findall(lower)
        single, pairs = grams(lower, words)
        out.append(Features(single, pairs, structure(chunk, lower, words) + h))
    return out


class Model:
    """A loaded scorer: bias, one weight per dense input, and dicts of sparse weights. Read-only
    once built, so one instance serves every thread."""
    __slots__ = ("bias", "dense", "single", "pairs")

    def __init__(self, bias: float, dense: list[float], single: dict[str, float], pairs: dict[tuple[str, str], float]):
        if len(dense) != len(DENSE_INPUTS):
            raise ValueError(f"the model has {len(dense)} dense weights, the code reads {len(DENSE_INPUTS)}")
        self.bias, self.dense, self.single, self.pairs = bias, dense, single, pairs

    @classmethod
    def from_json(cls, doc: dict) -> "Model":
        if doc.get("format") != 1:
            raise ValueError("unknown jailbreak model format; rebuild it with tools/train_detector.py")
        dense = [float(doc["dense"][name]) for name in DENSE_INPUTS]
        pairs = {tuple(k.split(" ", 1)): float(v) for k, v in doc["pairs"].items()}
        return cls(float(doc["bias"]), dense, {k: float(v) for k, v in doc["single"].items()}, pairs)

    def chunk_logit(self, f: Features) -> float:
        """Log-odds that one chunk is a prompt injection. Sparse features are binary and scaled
        by 1/sqrt(their count), so a long chunk does not win by sheer vocabulary."""
        zero = itertools.repeat(0.0)
        sparse = sum(map(self.single.get, f.single, zero)) + sum(map(self.pairs.get, f.pairs, zero))
        n = len(f.single) + len(f.pairs)
        z = self.bias + (sparse / math.sqrt(n) if n else 0.0)
        return z + sum(map(float.__mul__, self.dense, f.dense))

    def logit(self, norm: str, heuristic: dict[str, float]) -> float:
        """Log-odds for a normalised text: its most suspicious chunk."""
        return max(self.chunk_logit(f) for f in features(norm, heuristic))

    def probability(self, norm: str, heuristic: dict[str, float]) -> float:
        z = self.logit(norm, heuristic)
        return 1.0 / (1.0 + math.exp(-z)) if z > -40 else 0.0


@functools.cache
def shipped_model() -> Model:
    """The model in the package's data (read once, lazily: a proxy without a jailbreak rule never
    pays for it). importlib.resources reads it from the installed package and from the zipapp."""
    text = importlib.resources.files("tokenomics.guard").joinpath(WEIGHTS_RESOURCE).read_text(encoding="utf-8")
    return Model.from_json(json.loads(text))
