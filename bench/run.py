"""`make bench`: run every benchmark, write bench/results/*.json and the table in docs/benchmarks.md.

Each benchmark measures ours and the anchor side by side in one run on the same inputs, so the
ratios hold even on a shared, noisy machine; absolute times are for context only.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from bench import curation, labeler, labeler_outside, pipeline, random_model, retrieval, scoring, training
from bench.common import HH, RESULTS, ROOT, machine
from trainers.scoring.model import ONNX_INT8

# The benchmarks page; the table between BEGIN and END is rewritten, the rest is left as it is.
BENCHMARKS_DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def table() -> str:
    rows = ["| benchmark | ours | anchor | ratio | target | notes |", "|---|---|---|---|---|---|"]
    t = RESULTS / "training.json"
    if t.exists():
        r = json.loads(t.read_text())
        setup = f"MiniLM, batch {r['batch_size']}, {r['steps']} steps, max_length {r['max_length']}"
        trl = r["trl"]
        recipe = " ".join(["--freeze-embeddings"] * bool(r.get("freeze_embeddings"))
                          + [f"--freeze-layers {r['freeze_layers']}"] * bool(r.get("freeze_layers")))
        runs = [(f"ours {recipe or 'full fine-tune'} vs TRL full fine-tune; dropout off in both", r["ours"], r["speedup"])]
        if "ours_full_fine_tune" in r:
            runs.append(("both full fine-tunes, same run", r["ours_full_fine_tune"], r["speedup_full_fine_tune"]))
        for what, ours, ratio in runs:
            # Repeated trainers (palindromic order) show each run's seconds: the drift they averaged out.
            each = "; ".join(f"{name} runs {' and '.join(f'{x:.0f}' for x in row['seconds_each'])} s"
                             for name, row in (("ours", ours), ("TRL", trl)) if "seconds_each" in row)
            rows.append(f"| training, pairs/s ({setup}; {what}) | {ours['pairs_per_s']} | TRL RewardTrainer "
                        f"{trl['pairs_per_s']} | {ratio}x | >= 1.5x at equal or better accuracy | held-out accuracy "
                        f"ours {ours['heldout_accuracy']:.3f} vs TRL {trl['heldout_accuracy']:.3f} on {r['eval_pairs']} pairs"
                        + (f"; {each}" if each else "") + " |")
    s = RESULTS / "scoring.json"
    if s.exists():
        r = json.loads(s.read_text())
        rows.append(f"| scoring, pairs/s ({r['pairs']} HH-RLHF pairs, max_length {r['max_length']}) | fp32 ONNX, dynamic "
                    f"padding {r['onnx_fp32_pairs_per_s']} | transformers fp32, padding=max_length {r['naive_pairs_per_s']} | "
                    f"{r['speedup_onnx_fp32']}x | >= 4x, agreement >= 0.995 | decision agreement with fp32 torch "
                    f"{r['decision_agreement_onnx_fp32_vs_torch_fp32']:.3f} |")
        rows.append(f"| scoring, INT8 ONNX (same run) | {r['onnx_int8_pairs_per_s']} | naive {r['naive_pairs_per_s']} | "
                    f"{r['speedup_onnx_int8']}x | >= 4x, agreement >= 0.995 | decision agreement "
                    f"{r['decision_agreement_int8_vs_torch_fp32']:.3f}: {'served' if r['served'] == 'int8' else 'refused by the export check, fp32 ONNX serves'} |")
    rt = RESULTS / "retrieval.json"
    if rt.exists():
        r = json.loads(rt.read_text())
        rows.append(f"| retrieval p99 at {r['indexed']:,} indexed prompts, k={r['k']} | {r['p99_ms']} ms (IVF) | full sort "
                    f"| recall@{r['k']} {r['recall_at_k']:.3f} | p99 < 20 ms, recall >= 0.95 | p50 {r['p50_ms']} ms |")
    lb = RESULTS / "labeler.json"
    if lb.exists():
        rows += labeler.rows(json.loads(lb.read_text()))
    mt = RESULTS / "labeler-mtbench.json"  # written by bench.labeler_outside, which needs a FastChat checkout
    if mt.exists():
        rows += labeler_outside.rows(json.loads(mt.read_text()))
    for name, models in (("pipeline", "the served model alone"), ("pipeline-gold", "current and gold models"),
                         ("pipeline-current", "the BERT-base-sized model alone")):
        pl = RESULTS / f"{name}.json"
        if pl.exists():
            rows += _pipeline_rows(json.loads(pl.read_text()), models)
    cur = RESULTS / "curation.json"
    if cur.exists():
        rows += curation.rows(json.loads(cur.read_text()))
    m = machine()
    rows.append("")
    rows.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, torch {m['torch']}. "
                "Command: `make bench` (results in `bench/results/*.json`).")
    if lb.exists():  # the labeler's misses per category, as its table row says
        rows += ["", *labeler.confusion_table(json.loads(lb.read_text()))]
    return "\n".join(rows)


def _pipeline_rows(r: dict, models: str) -> list[str]:
    each = r["e2e_vs_bare_each_run"]
    gold = len(r.get("models", [])) > 1
    larger = r["name"] == "pipeline-current"
    rest = (f"2 workers: {r['e2e_2_workers_pairs_per_s']} pairs/s ({r['scaling_2_vs_1']}x of 1)"
            if r.get("e2e_2_workers_pairs_per_s") else "")
    what = ", with a gold RM" * gold + ", a random BERT-base-sized RM (`bench.random_model`)" * larger
    rows = [f"| stream end to end, pairs/s ({r['pairs']} HH-RLHF pairs, 1 worker{what}; "
            f"median of {len(each)} runs, each against the bare runs just before and after it) | "
            f"{r['e2e_1_worker_pairs_per_s']} | bare scorer ({models}) {r['bare_scorer_pairs_per_s']} | {r['e2e_vs_bare']}x | "
            f">= 0.9x | each run: {', '.join(f'{x}x' for x in each)}{'; ' + rest if rest else ''} |",
            f"| where the last 1-worker run's {r['e2e_1_worker_seconds_each'][-1]:.1f} s went "
            "(`prefstream_stage_seconds`) | " + ", ".join(f"{k} {v} s" for k, v in r["one_worker_stage_seconds"].items())
            + f" | bare scorer {r['bare_scorer_seconds']} s | | | the rest is waiting for records |"]
    lat = r.get("latency_at_half_max_rate")
    if lat:
        rows.append(f"| produce -> prefs.scored latency at {lat['rate_pairs_per_s']} pairs/s (half max) | p50 {lat['p50_ms']} ms, "
                    f"p99 {lat['p99_ms']} ms | | | p99 < 500 ms | {lat['records']} records |")
    return rows


def update_benchmarks_doc() -> None:
    text = BENCHMARKS_DOC.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        BENCHMARKS_DOC.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")


def main() -> int:
    if not HH.exists():
        print(f"shared data not present: {HH}; the benchmarks need ../shared/data", file=sys.stderr)
        return 1
    model = Path(tempfile.mkdtemp(prefix="bench-model-"))
    print("training: ours vs TRL ...", flush=True)
    print(training.main(["--keep-model", str(model)]), flush=True)  # ~28 min on 2 cores (TRL and our recipe run twice each)
    print("exporting our trained model to ONNX INT8 ...", flush=True)
    from trainers.export.onnx import export
    from trainers.training.data import read_pairs

    pairs = read_pairs([HH])[1000:1300]  # validation pairs outside the scored 1,000
    int8_checked = True
    try:
        print(export(model, pairs, quantize=True), flush=True)
    except Exception as exc:  # report and continue with what was written: the table shows agreement anyway
        print(f"export check failed: {exc}", flush=True)
        int8_checked = False
        export(model, pairs, quantize=True, min_agreement=0.0)
    # The gold model of the stream run is this trained model as a worker would get it: without the
    # INT8 file when the export check refused it (the scoring bench above still measures that file).
    gold = Path(tempfile.mkdtemp(prefix="bench-gold-"))
    shutil.copytree(model, gold, dirs_exist_ok=True, ignore=None if int8_checked else shutil.ignore_patterns(ONNX_INT8))
    print("scoring: ours (fp32 and INT8 ONNX) vs naive transformers ...", flush=True)
    print(scoring.main(["--model", str(model)]), flush=True)
    print("retrieval at 100k ...", flush=True)
    print(retrieval.main([]), flush=True)
    print("curation study: like for like, raw vs curated vs truth, 3 seeds, two lengths, generated and HH-RLHF ...",
          flush=True)
    curation.main([])
    print("labeler: top-1 on the labelled set, time against the two-example labeler ...", flush=True)
    labeler.main([])
    print("stream pipeline end to end ...", flush=True)
    print(pipeline.main([]), flush=True)
    print("stream pipeline end to end with a gold model ...", flush=True)
    print(pipeline.main(["--gold", str(gold)]), flush=True)
    # Where the model is the bottleneck, as with real reward models. At ~7.5x MiniLM's time per pair,
    # 300 pairs are enough: 3 runs and 4 bare calls took 11 min here, the plain run above 8.
    print("stream pipeline end to end with a BERT-base-sized model ...", flush=True)
    larger = random_model.build(Path(tempfile.mkdtemp(prefix="bench-base-")))
    print(pipeline.main(["--current", str(larger), "--pairs", "300"]), flush=True)
    update_benchmarks_doc()
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
