"""Labeler: top-1 task-category accuracy on a labelled set, and its cost against the anchor.

The labelled set, ``bench/data/labeler_eval.jsonl``, holds hand-written prompts (at least 5 per
taxonomy category, some of them multi-turn conversations) and the demo generator's task types
(``streams/local/generate.py``, each prompt template mapped to its category). No text in it is a
taxonomy example. Each line is split ``dev`` (looked at while choosing the method) or ``heldout``
(the floor of ``tests/test_labeler.py``), alternating within each category.

Ours is the worker's labeler. The anchor is the two-example labeler: one centroid per category
from the description and the first two examples, on the last user turn only. The other variants
are the candidates it was chosen among, computed from the same embeddings. Speed is the time to
label HH-RLHF pairs (multi-turn conversations, as the worker sees them), ours and the anchor
alternating on the same pairs with the embedding cache emptied before each run, as the ratio of
their medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench.common import ROOT, hh_pairs, write_result
from schemas.formats import read_objects

EVAL_SET = ROOT / "bench" / "data" / "labeler_eval.jsonl"
SPLITS = ("dev", "heldout")
ANCHOR_EXAMPLES = 2  # examples per category in the anchor's centroids
BATCH = 256  # pairs per labeler call, a worker micro-batch


def load_eval_set(path: Path = EVAL_SET) -> list[dict]:
    """The labelled rows: ``split``, ``category``, ``source`` (hand or generate:<type>), ``conversation``."""
    return read_objects(path)


def as_pair(row: dict) -> dict:
    return {"conversation": row["conversation"], "chosen": "a", "rejected": "b"}


def predict(labeler, rows: list[dict], conversation: bool = True) -> list[str]:
    """The labeler's category per row: whole conversation (the worker's way) or the last user turn."""
    from schemas.pairs import prompt_text
    from streams.runtime.processors.labeler import earlier_turns

    pairs = [as_pair(r) for r in rows]
    contexts = [earlier_turns(p) for p in pairs] if conversation else None
    return labeler.categorize([prompt_text(p) for p in pairs], contexts)


def accuracy(rows: list[dict], predicted: list[str], split: str | None = None) -> float:
    hits = [p == r["category"] for r, p in zip(rows, predicted, strict=True) if split in (None, r["split"])]
    return round(sum(hits) / len(hits), 4)


def confusion(rows: list[dict], predicted: list[str]) -> dict[str, dict]:
    """Per true category: rows, hits, and what the misses were labelled instead (most frequent first)."""
    out: dict[str, dict] = {}
    for r, p in zip(rows, predicted, strict=True):
        c = out.setdefault(r["category"], {"n": 0, "correct": 0, "instead": Counter()})
        c["n"] += 1
        c["correct"] += p == r["category"]
        if p != r["category"]:
            c["instead"][p] += 1
    return {k: v | {"instead": dict(v["instead"].most_common())} for k, v in sorted(out.items())}


def anchor_labeler(embedder):
    """The labeler with one centroid per category from its description and first two examples, on
    the last user turn only."""
    from dataclasses import replace

    from streams.runtime.processors.labeler import Labeler, load_taxonomy

    class LastTurnLabeler(Labeler):
        def categorize(self, prompts, contexts=None):
            return super().categorize(prompts)

    return LastTurnLabeler(embedder, [replace(c, examples=c.examples[:ANCHOR_EXAMPLES]) for c in load_taxonomy()])


def variants(labeler, rows: list[dict]) -> dict[str, dict]:
    """Candidates on the last user turn, from the same example embeddings: accuracy per split."""
    from schemas.pairs import prompt_text

    q = labeler.embedder.embed([prompt_text(as_pair(r)) for r in rows])
    names = [c.name for c in labeler.taxonomy]
    examples = [labeler.embedder.embed([c.description, *c.examples]) for c in labeler.taxonomy]

    def scored(rule) -> dict:
        pred = [names[i] for i in np.stack([rule(e) for e in examples]).argmax(axis=0)]
        return {s: accuracy(rows, pred, s) for s in SPLITS} | {"all": accuracy(rows, pred)}

    return {"centroid (ours without the earlier turns)": scored(lambda e: q @ (e.mean(0) / np.linalg.norm(e.mean(0)))),
            "nearest example": scored(lambda e: (e @ q.T).max(axis=0)),
            "mean of the 3 nearest examples": scored(lambda e: np.sort(e @ q.T, axis=0)[-3:].mean(axis=0))}


def _time(labeler, pairs: list[dict]) -> float:
    labeler.embedder._cache.clear()  # each run embeds every text, as fresh pairs in the stream do
    t = time.perf_counter()
    for i in range(0, len(pairs), BATCH):
        labeler.label([dict(p) for p in pairs[i:i + BATCH]])
    return time.perf_counter() - t


def speed(ours, anchor, pairs: list[dict], repeats: int) -> dict:
    seconds: dict[str, list[float]] = {"ours": [], "anchor": []}
    for i in range(repeats):  # alternating, each first in turn, so drift of the machine cancels
        order = (("ours", ours), ("anchor", anchor)) if i % 2 == 0 else (("anchor", anchor), ("ours", ours))
        for name, lab in order:
            seconds[name].append(round(_time(lab, pairs), 3))
    med = {k: statistics.median(v) for k, v in seconds.items()}
    multi = sum(sum(t["role"] == "user" for t in p["conversation"]) > 1 for p in pairs)
    return {"pairs": len(pairs), "multi_turn_pairs": multi, "seconds_each": seconds,
            "ours_pairs_per_s": round(len(pairs) / med["ours"], 1), "anchor_pairs_per_s": round(len(pairs) / med["anchor"], 1),
            "time_ratio": round(med["ours"] / med["anchor"], 2)}


def run(pairs: int, repeats: int, precision: str) -> dict:
    from streams.runtime.processors.embedder import Embedder
    from streams.runtime.processors.labeler import Labeler

    rows = load_eval_set()
    embedder = Embedder(precision=precision)
    ours, anchor = Labeler(embedder), anchor_labeler(embedder)
    got, old = predict(ours, rows), predict(anchor, rows, conversation=False)
    result = {"precision": embedder.precision, "rows": {s: sum(r["split"] == s for r in rows) for s in SPLITS},
              "categories": len({r["category"] for r in rows}),
              "multi_turn_rows": sum(sum(t["role"] == "user" for t in r["conversation"]) > 1 for r in rows),
              "ours": {s: accuracy(rows, got, s) for s in SPLITS} | {"all": accuracy(rows, got)},
              "anchor": {s: accuracy(rows, old, s) for s in SPLITS} | {"all": accuracy(rows, old)},
              "variants": variants(ours, rows), "confusion": confusion(rows, got), "target_top1": 0.85}
    hh = [{"conversation": p["conversation"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in hh_pairs(pairs)]
    return result | {"speed": speed(ours, anchor, hh, repeats)}


def rows(r: dict) -> list[str]:
    """The benchmarks table's labeler rows (bench/run.py)."""
    o, a, s = r["ours"], r["anchor"], r["speed"]
    n = r["rows"]
    return [f"| labeler top-1 task category ({n['dev'] + n['heldout']} labelled prompts, {r['categories']} categories, "
            f"{r['precision']} MiniLM; dev {n['dev']} / held-out {n['heldout']}) | {o['all']:.3f} (dev {o['dev']:.3f}, "
            f"held-out {o['heldout']:.3f}) | two-example centroids, last turn {a['all']:.3f} (dev {a['dev']:.3f}, "
            f"held-out {a['heldout']:.3f}) | +{o['all'] - a['all']:.3f} | >= {r['target_top1']} | per-category misses "
            "below the table |",
            f"| labeler time, {s['pairs']} HH-RLHF pairs ({s['multi_turn_pairs']} multi-turn), batches of {BATCH} | "
            f"{s['ours_pairs_per_s']} pairs/s | anchor {s['anchor_pairs_per_s']} pairs/s | {s['time_ratio']}x the time | "
            f"<= 2x | median of {len(s['seconds_each']['ours'])} alternating runs each |"]


def confusion_table(r: dict) -> list[str]:
    """Categories with misses on the labelled set: what they were labelled instead."""
    out = ["| category (labeler misses) | top-1 | labelled instead as |", "|---|---|---|"]
    for cat, c in r["confusion"].items():
        if c["correct"] < c["n"]:
            out.append(f"| {cat} | {c['correct']}/{c['n']} | " + ", ".join(f"{k} {v}" for k, v in c["instead"].items()) + " |")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1000, help="HH-RLHF pairs for the speed comparison")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each labeler, alternating")
    ap.add_argument("--precision", default="int8", choices=("int8", "fp32"), help="the embedder's (the worker's default: int8)")
    args = ap.parse_args(argv)
    result = run(args.pairs, args.repeats, args.precision)
    name = "labeler" if args.precision == "int8" else f"labeler-{args.precision}"
    write_result(name, result, f"python -m bench.labeler --pairs {args.pairs} --repeats {args.repeats} "
                               f"--precision {args.precision}")
    print("\n".join(rows(result) + [""] + confusion_table(result)))
    return result


if __name__ == "__main__":
    main()
