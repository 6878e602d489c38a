"""Labeler on a labelled set the project did not write: MT-Bench's 80 two-turn questions.

MT-Bench (FastChat, ``fastchat/llm_judge/data/mt_bench``, Apache-2.0) labels each question with one
of 8 coarse categories. MAPPING says which of the taxonomy's 54 categories count as each one; it was
written from the category descriptions, before any prediction was looked at, and is never tuned. A
prediction is a hit when it is one of the question's mapped categories (coarse top-1). Nothing of
MT-Bench is stored in this repository: pass the directory of a FastChat checkout.

Three readings of the same questions, with the worker's labeler:
- first turn: the first question alone (a one-turn pair);
- user turns: the follow-up question with the first question before it (no answer between);
- whole conversation: the follow-up with the first question and, where MT-Bench has one
  (``reference_answer/gpt-4.jsonl``: the math, reasoning and coding questions), GPT-4's answer to
  it between them, as the worker reads a conversation.

The interval is the 95% Wilson interval of each share (80 questions: about +-0.1).
"""

from __future__ import annotations

import argparse
import hashlib
import math
from collections import Counter
from pathlib import Path

from bench.common import write_result
from schemas.formats import read_objects

MAPPING: dict[str, set[str]] = {
    "writing": {"creative_story", "poetry", "copywriting_marketing", "email_letter_writing", "essay_writing",
                "grammar_editing"},
    "roleplay": {"roleplay"},
    "reasoning": {"trivia_games"},
    "math": {"arithmetic", "math_word_problem", "algebra", "calculus", "statistics_probability", "unit_conversion"},
    "coding": {"python_coding", "code_debugging", "code_explanation", "javascript_coding", "sql_databases",
               "shell_devops", "algorithms"},
    "extraction": {"classification_extraction"},
    "stem": {"science_physics", "science_chemistry", "science_biology", "medical_health", "education_tutoring"},
    "humanities": {"history", "geography", "economics", "legal", "finance_personal", "business_strategy",
                   "religion_philosophy", "controversial_politics", "education_tutoring"},
}
READINGS = ("first turn", "user turns", "whole conversation")


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(centre - half, 3), round(centre + half, 3))


def conversations(question: dict, answer: str | None) -> dict[str, list[dict]]:
    first, follow_up = question["turns"][:2]
    user = {"role": "user"}
    between = [{"role": "assistant", "content": answer}] if answer else []
    return {"first turn": [user | {"content": first}],
            "user turns": [user | {"content": first}, user | {"content": follow_up}],
            "whole conversation": [user | {"content": first}, *between, user | {"content": follow_up}]}


def load(directory: Path) -> tuple[list[dict], dict[int, str]]:
    questions = read_objects(directory / "question.jsonl")
    unknown = sorted({q["category"] for q in questions} - MAPPING.keys())
    if unknown:
        raise SystemExit(f"{directory}/question.jsonl has categories the mapping lacks: {unknown}; add them to "
                         "bench/labeler_outside.py MAPPING")
    ref = directory / "reference_answer" / "gpt-4.jsonl"
    answers = {a["question_id"]: a["choices"][0]["turns"][0] for a in read_objects(ref)} if ref.exists() else {}
    return questions, answers


def run(directory: Path, precision: str) -> dict:
    from schemas.pairs import prompt_text
    from streams.runtime.processors.embedder import Embedder
    from streams.runtime.processors.labeler import Labeler, earlier_turns

    questions, answers = load(directory)
    labeler = Labeler(Embedder(precision=precision))
    digest = hashlib.sha256((directory / "question.jsonl").read_bytes()).hexdigest()
    out: dict = {"source": "MT-Bench question.jsonl (lm-sys/FastChat)", "question_jsonl_sha256": digest,
                 "questions": len(questions),
                 "with_reference_answer": sum(q["question_id"] in answers for q in questions), "readings": {}}
    for reading in READINGS:
        pairs = [{"conversation": conversations(q, answers.get(q["question_id"]))[reading]} for q in questions]
        predicted = labeler.categorize([prompt_text(p) for p in pairs], [earlier_turns(p) for p in pairs])
        hits = [p in MAPPING[q["category"]] for q, p in zip(questions, predicted, strict=True)]
        per: dict[str, list[int]] = {}
        for q, hit in zip(questions, hits, strict=True):
            per.setdefault(q["category"], [0, 0])[0] += hit
            per[q["category"]][1] += 1
        misses = Counter(f"{q['category']} -> {p}" for q, p, hit in zip(questions, predicted, hits, strict=True)
                         if not hit)
        out["readings"][reading] = {"top1": round(sum(hits) / len(hits), 3), "interval95": wilson(sum(hits), len(hits)),
                                    "per_category": {c: f"{h}/{n}" for c, (h, n) in sorted(per.items())},
                                    "misses": dict(misses.most_common())}
    return out


def rows(r: dict) -> list[str]:
    """The benchmarks table's row (bench/run.py)."""
    cells = " · ".join(f"{k} {v['top1']:.3f} [{v['interval95'][0]:.2f}, {v['interval95'][1]:.2f}]"
                       for k, v in r["readings"].items())
    return [f"| labeler coarse top-1 on MT-Bench ({r['questions']} two-turn questions, 8 categories, not written "
            f"here; {r['with_reference_answer']} with an answer between the turns) | {cells} | - | - | - | "
            "mapping and method in the Labeler section |"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mt_bench", type=Path, help="FastChat's fastchat/llm_judge/data/mt_bench directory")
    ap.add_argument("--precision", default="int8", choices=("int8", "fp32"), help="the embedder's (the worker's: int8)")
    args = ap.parse_args(argv)
    if not (args.mt_bench / "question.jsonl").exists():
        raise SystemExit(f"no question.jsonl in {args.mt_bench}: pass FastChat's fastchat/llm_judge/data/mt_bench "
                         "(git clone https://github.com/lm-sys/FastChat)")
    result = run(args.mt_bench, args.precision)
    write_result("labeler-mtbench", result, f"python -m bench.labeler_outside <FastChat>/fastchat/llm_judge/data/mt_bench "
                                            f"--precision {args.precision}")
    print("\n".join(rows(result)))
    for reading, v in result["readings"].items():
        print(f"{reading}: {v['per_category']}")
    return result


if __name__ == "__main__":
    main()
