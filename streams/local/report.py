"""The demo report: numbers computed from the records in the topics, written as JSON, markdown,
HTML and PNG plots.

Every count here is recomputed from what the pipeline wrote (prefs.scored, prefs.curated,
prefs.annotations, models.versions, prefs.dlq) joined with the generator's known truth, so the
report cannot claim what the stream did not do.
"""

from __future__ import annotations

import html
import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from streams.kafka import topics
from streams.kafka.reader import read_topic
from streams.local.generate import truly_better
from streams.settings import Settings

CORRECTING_SPLITS = ("gold", "flipped", "verified_by_tool")


def _read(settings: Settings, topic: str, schema: str, idle: float = 3.0) -> list[tuple[dict, int]]:
    """(record, broker timestamp ms) for every record of a logical topic."""
    return [(r.value, r.timestamp_ms) for r in read_topic(settings, topic, schema, idle_timeout=idle)]


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _prf(flagged: set[str], truth: set[str]) -> dict[str, Any]:
    tp = len(flagged & truth)
    return {"flagged": len(flagged), "true_positives": tp,
            "precision": tp / len(flagged) if flagged else None, "recall": tp / len(truth) if truth else None}


def noise_detection(stream: list[dict], scored: dict[str, dict], curated: dict[str, dict]) -> dict[str, Any]:
    """Precision and recall of finding the deliberately flipped labels.

    corrected: the pair reached the training shards with its label swapped (human review,
    verifier, or label-flip recycling). filtered: corrected, or removed by the gold-model
    consistency filter (route 'dropped' because the gold model disagreed).
    """
    known = {p["pair_id"]: p for p in stream if (p.get("metadata") or {}).get("flipped") in ("true", "false")}
    flipped = {i for i, p in known.items() if p["metadata"]["flipped"] == "true"}
    corrected: set[str] = set()
    by: Counter[str] = Counter()
    for i, c in curated.items():
        if i in known and c["pair"]["chosen"] != known[i]["chosen"]:
            corrected.add(i)
            by[c["split"]] += 1
    filtered = corrected | {i for i, s in scored.items() if i in known and s.get("route") == "dropped"
                            and "gold" in (s.get("route_reason") or "")}
    right = sum(1 for i, c in curated.items() if i in known and c["pair"]["chosen"] == truly_better(known[i]))
    n_cur = sum(1 for i in curated if i in known)
    return {"pairs_with_known_truth": len(known), "flipped_in_stream": len(flipped),
            "corrected": _prf(corrected, flipped), "corrected_by_split": dict(by),
            "corrected_or_filtered": _prf(filtered, flipped),
            "stream_label_accuracy": 1 - len(flipped) / len(known) if known else None,
            "curated_label_accuracy": right / n_cur if n_cur else None, "curated_pairs_with_known_truth": n_cur}


def evaluate_versions(settings: Settings, holdout: list[dict], max_length: int) -> list[dict[str, Any]]:
    """Clean-holdout and style-trap accuracy of the untrained bootstrap and every current version."""
    from schemas.pairs import validate_pair
    from trainers.model import ONNX_INT8, RewardModel
    from trainers.registry import ModelStore

    pairs = [validate_pair(p) for p in holdout]
    traps = np.array([(p.get("metadata") or {}).get("style_trap") == "true" for p in pairs])
    cats = [(p.get("metadata") or {}).get("gen_category", "?") for p in pairs]

    def measure(rm: Any) -> dict[str, Any]:
        rc, rr = rm.score_pairs(pairs)
        ok = rc > rr
        by = defaultdict(list)
        for c, o in zip(cats, ok, strict=True):
            by[c].append(bool(o))
        return {"holdout_accuracy": float(ok.mean()), "style_trap_accuracy": float(ok[traps].mean()) if traps.any() else None,
                "by_category": {c: float(np.mean(v)) for c, v in sorted(by.items())}, "holdout_pairs": len(pairs),
                "style_trap_pairs": int(traps.sum())}

    import torch

    torch.manual_seed(0)  # the bootstrap's random head, as the worker builds it
    out = [{"version": "bootstrap", "role": "current", "parent": None, "published_at": None} |
           measure(RewardModel.default(max_length=max_length))]
    store = ModelStore(settings.models_dir)
    for info in store.list():
        if info.role != "current":
            continue  # the gold model is Stage 1's weights again (see run_seed); the report follows current
        backend = "onnx" if (info.path / ONNX_INT8).exists() else "torch"
        rm = RewardModel.load(info.path, backend=backend, max_length=max_length)
        out.append({"version": info.version, "role": info.role, "parent": info.manifest.get("parent"),
                    "published_at": info.manifest.get("created_at"), "backend": backend,
                    "lineage": {k: v for k, v in info.manifest.get("lineage", {}).items() if k != "shards"}} | measure(rm))
    return out


def hot_swaps(versions: list[tuple[dict, int]], scored: list[tuple[dict, int]], decisions: list[dict]) -> list[dict[str, Any]]:
    """For each version the controller published: announcement -> first pair scored by it (seconds)."""
    published = {d.get("version") for d in decisions if d["decision"] == "published" and d["role"] == "current"}
    first: dict[str, int] = {}
    for rec, _ in scored:
        v = rec["model_version"]
        first[v] = min(first.get(v, rec["scored_at"]), rec["scored_at"])
    out = []
    for rec, _ in versions:
        if rec["role"] != "current" or rec["version"] not in published or rec["action"] != "promote":
            continue
        seen = first.get(rec["version"])
        out.append({"version": rec["version"], "announced_at": rec["announced_at"] / 1000,
                    "first_scored_after_s": (seen - rec["announced_at"]) / 1000 if seen else None})
    return out


def annotator_agreement(annotations: list[tuple[dict, int]]) -> dict[str, Any]:
    from streams.review.aggregator import alpha

    units: dict[str, dict[str, str]] = defaultdict(dict)
    experts = 0
    for a, _ in annotations:
        if a["expert"]:
            experts += 1
        elif not a["reannotation"]:
            units[a["task_id"]][a["annotator"]] = a["preferred"]
    full = [u for u in units.values() if len(u) >= 2]
    return {"verdicts": len(annotations), "tasks": len(units), "expert_verdicts": experts,
            "alpha": alpha(full) if full else None}


def build(run: Any, data: dict[str, list[dict]], decisions: list[dict]) -> dict[str, Any]:
    s, cfg = run.settings, run.cfg
    scored_raw = _read(s, topics.SCORED, "ScoredPair")
    curated_raw = _read(s, topics.CURATED, "CuratedPair")
    annotations = _read(s, topics.ANNOTATIONS, "Annotation")
    versions = _read(s, topics.MODEL_VERSIONS, "ModelVersion")
    dlq = _read(s, topics.DLQ, "DeadLetter", idle=1.0)
    stream = data["stream"]
    ids = {p["pair_id"] for p in stream}
    scored: dict[str, dict] = {}
    for rec, _ in scored_raw:
        scored[rec["pair"]["pair_id"]] = rec  # the last record per pair_id is the one that counts
    curated: dict[str, dict] = {}
    for rec, _ in curated_raw:
        curated[rec["pair"]["pair_id"]] = rec
    routes = Counter(scored[i].get("route") or "none" for i in ids if i in scored)
    latency = [ts / 1000 - run.sent_at[rec["pair"]["pair_id"]] for rec, ts in scored_raw
               if rec["pair"]["pair_id"] in run.sent_at and ts > 0]
    times = sorted(ts / 1000 for _, ts in scored_raw if ts > 0)
    window = 10.0
    peak = 0.0
    j = 0
    for i, t in enumerate(times):  # the busiest 10 s of scoring
        while times[j] < t - window:
            j += 1
        peak = max(peak, (i - j + 1) / window)
    by_phase = []
    for ph in run.phases:
        in_phase = [(rec, ts) for rec, ts in scored_raw if ph["started"] <= run.sent_at.get(rec["pair"]["pair_id"], 0) < ph["ended"]]
        lat_ph = [ts / 1000 - run.sent_at[rec["pair"]["pair_id"]] for rec, ts in in_phase if ts > 0]
        span = ph["ended"] - ph["started"]
        by_phase.append({"phase": ph["phase"], "pairs": len(in_phase), "seconds": round(span, 1),
                         "pairs_per_s": len(in_phase) / span if span > 0 else None,
                         "p50_s": _pct(lat_ph, 50), "p99_s": _pct(lat_ph, 99),
                         "training_alongside": ph["phase"] <= cfg.retrains})
    rolled_back = {d.get("version") for d in decisions if d["decision"] == "rolled_back"}
    evals = evaluate_versions(s, data["holdout"], cfg.max_length)
    for e in evals:
        e["rolled_back"] = e["version"] in rolled_back
    initial = next((e for e in evals if e["role"] == "current" and e["version"] != "bootstrap"), None)
    final = [e for e in evals if e["role"] == "current" and not e["rolled_back"]][-1]
    report = {
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S"), "topic_prefix": s.topic_prefix,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
        "pairs": {"streamed": len(stream), "generated": sum(1 for p in stream if p["pair_id"].startswith("gen-")),
                  "hh_rlhf": sum(1 for p in stream if not p["pair_id"].startswith("gen-")),
                  "scored": len(ids & set(scored)), "scored_records": len(scored_raw),
                  "missing": len(ids - set(scored)), "dead_letters": len(dlq)},
        "routes": dict(routes), "curated_by_split": dict(Counter(c["split"] for c in curated.values())),
        "noise_detection": noise_detection(stream, scored, curated),
        "models": evals,
        "retrained_beats_initial": bool(initial and final is not initial
                                        and final["holdout_accuracy"] > initial["holdout_accuracy"]),
        "hot_swaps": hot_swaps(versions, scored_raw, decisions),
        "review": annotator_agreement(annotations) | {"simulated": run.annotator_stats},
        "throughput": {"scored_per_s_overall": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None,
                       "scored_per_s_peak_10s": peak, "produce_rate": cfg.rate,
                       "max_in_flight": cfg.max_in_flight},
        "latency_s": {"p50": _pct(latency, 50), "p99": _pct(latency, 99), "n": len(latency)},
        "phases": by_phase,
        "controller": [{k: d[k] for k in ("time", "role", "decision", "reason") if k in d} | {"version": d.get("version")}
                       for d in decisions],
        "stage_seconds": run.stage_seconds, "failures": list(run.failures),
    }
    report["_series"] = {"latency": latency,
                         "routes": [(rec["scored_at"] / 1000, rec.get("route") or "none") for rec, _ in scored_raw]}
    return report


# ---------------------------------------------------------------------------- files
def _save(fig: Any, path: Path, files: list[str]) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    files.append(path.name)
    plt.close(fig)


def plots(report: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    cur = [m for m in report["models"] if m["role"] == "current"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = np.arange(len(cur))
    ax.bar(x - 0.2, [m["holdout_accuracy"] for m in cur], 0.4, label="clean holdout")
    ax.bar(x + 0.2, [m["style_trap_accuracy"] or 0 for m in cur], 0.4, label="style traps")
    ax.set_xticks(x, [m["version"] for m in cur], rotation=15, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("reward model accuracy by version")
    ax.legend(loc="lower right")
    _save(fig, out / "accuracy_by_version.png", files)

    series = report["_series"]["routes"]
    if series:
        t0 = min(t for t, _ in series)
        kinds = sorted({r for _, r in series})
        bins = np.arange(0, max(t for t, _ in series) - t0 + 10, 10)
        fig, ax = plt.subplots(figsize=(7, 3.5))
        counts = [np.histogram([t - t0 for t, r in series if r == k], bins=bins)[0] for k in kinds]
        ax.stackplot(bins[:-1], counts, labels=kinds)
        for sw in report["hot_swaps"]:
            ax.axvline(sw["announced_at"] - t0, color="k", ls="--", lw=0.8)
        ax.set_xlabel("seconds (dashed: a new version announced)")
        ax.set_ylabel("pairs per 10 s")
        ax.set_title("routes over time")
        ax.legend(fontsize=7, loc="upper right")
        _save(fig, out / "routes_over_time.png", files)

    lat = report["_series"]["latency"]
    if lat:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.hist(lat, bins=40)
        for q, style in (("p50", "-"), ("p99", "--")):
            ax.axvline(report["latency_s"][q], color="k", ls=style, lw=0.8, label=f"{q} {report['latency_s'][q]:.2f} s")
        ax.set_xlabel("seconds from produce to prefs.scored")
        ax.set_ylabel("pairs")
        ax.set_title("latency")
        ax.legend()
        _save(fig, out / "latency_histogram.png", files)
    return files


def _f(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt) if isinstance(v, float) else str(v)


def markdown(r: dict[str, Any], images: list[str]) -> str:
    nd, p = r["noise_detection"], r["pairs"]
    lines = ["# prefstream demo report", "", f"Generated {r['generated_at']}; topics `{r['topic_prefix']}*`.", ""]
    if r["failures"]:
        lines += ["**Failed stages:**", ""] + [f"- {f}" for f in r["failures"]] + [""]
    lines += ["## Pairs", "", "| streamed | generated | HH-RLHF | scored | missing | dead letters |", "|---|---|---|---|---|---|",
              f"| {p['streamed']} | {p['generated']} | {p['hh_rlhf']} | {p['scored']} | {p['missing']} | {p['dead_letters']} |",
              "", "Routes: " + ", ".join(f"{k} {v}" for k, v in sorted(r["routes"].items())),
              "", "Curated (training shards): " + ", ".join(f"{k} {v}" for k, v in sorted(r["curated_by_split"].items())), ""]
    lines += ["## Model versions (clean holdout)", "", "| version | parent | backend | holdout acc. | style-trap acc. | note |",
              "|---|---|---|---|---|---|"]
    for m in r["models"]:
        note = "rolled back live by the controller" if m.get("rolled_back") else ""
        lines.append(f"| {m['version']} | {m.get('parent') or '-'} | {m.get('backend', 'torch')} | "
                     f"{_f(m['holdout_accuracy'])} | {_f(m['style_trap_accuracy'])} | {note} |")
    lines += ["", f"Holdout: {r['models'][0]['holdout_pairs']} clean generated pairs, {r['models'][0]['style_trap_pairs']} "
              "of them style traps (the worse answer longer and in markdown). The latest retrained version that was not "
              f"rolled back beats the initial one: **{'yes' if r['retrained_beats_initial'] else 'no'}**.", ""]
    lines += ["## Flipped-label detection", "",
              f"{nd['flipped_in_stream']} of {nd['pairs_with_known_truth']} generated pairs had their label flipped on purpose.", "",
              "| detection | flagged | correct | precision | recall |", "|---|---|---|---|---|"]
    for name, key in (("label corrected (human review, verifiers, recycling)", "corrected"),
                      ("corrected or removed by the gold consistency filter", "corrected_or_filtered")):
        d = nd[key]
        lines.append(f"| {name} | {d['flagged']} | {d['true_positives']} | {_f(d['precision'])} | {_f(d['recall'])} |")
    lines += ["", "Corrections by split: " + ", ".join(f"{k} {v}" for k, v in sorted(nd["corrected_by_split"].items())),
              "", f"Label accuracy: {_f(nd['stream_label_accuracy'])} as published, {_f(nd['curated_label_accuracy'])} in "
              f"the training shards ({nd['curated_pairs_with_known_truth']} pairs).", ""]
    rv = r["review"]
    lines += ["## Human review", "", f"{rv['verdicts']} verdicts on {rv['tasks']} tasks ({rv['expert_verdicts']} by experts); "
              f"Krippendorff's alpha {_f(rv['alpha'])} (simulated annotators, accuracy {r['config']['annotator_accuracy']}).", ""]
    th, lat = r["throughput"], r["latency_s"]
    lines += ["## Throughput and latency", "", f"Scored {_f(th['scored_per_s_overall'], '.1f')} pairs/s over the run "
              f"(busiest 10 s: {_f(th['scored_per_s_peak_10s'], '.1f')}/s; produced at up to {th['produce_rate']}/s with at most {th['max_in_flight']} pairs in flight). "
              f"Produce to prefs.scored: p50 {_f(lat['p50'], '.3f')} s, p99 {_f(lat['p99'], '.3f')} s over {lat['n']} records.", ""]
    lines += ["| phase | pairs | seconds | scored per s | p50 latency | p99 latency | retraining alongside |",
              "|---|---|---|---|---|---|---|"]
    for ph in r["phases"]:
        lines.append(f"| {ph['phase']} | {ph['pairs']} | {ph['seconds']} | {_f(ph['pairs_per_s'], '.2f')} | "
                     f"{_f(ph['p50_s'], '.2f')} s | {_f(ph['p99_s'], '.2f')} s | {'yes' if ph['training_alongside'] else 'no'} |")
    lines += ["", "## Hot-swaps", "", "Versions the controller published, from the announcement on models.versions to the "
              "first pair the workers scored with it (traffic never paused; the load happens in the background).", "",
              "| version | first pair scored by it after |", "|---|---|"]
    for sw in r["hot_swaps"]:
        after = sw["first_scored_after_s"]
        lines.append(f"| {sw['version']} | {f'{after:.2f} s' if after is not None else 'no traffic after it'} |")
    lines += ["", "## Controller decisions", ""]
    lines += [f"- {time.strftime('%H:%M:%S', time.localtime(d['time']))} {d['role']}: {d['decision']} — {d['reason']}"
              for d in r["controller"]]
    lines += ["", "## Stages", ""] + [f"- {k}: {v:.0f} s" for k, v in r["stage_seconds"].items()] + [""]
    lines += [f"![{i}]({i})" for i in images]
    return "\n".join(lines) + "\n"


def to_html(md: str) -> str:
    """A small, safe rendering of our own markdown (headings, tables, lists, images); all text escaped."""
    out, in_table = [], False
    for line in md.splitlines():
        esc = html.escape(line)
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            if not in_table:
                out.append("<table>")
                in_table = True
                out.append("<tr>" + "".join(f"<th>{c}</th>" for c in cells) + "</tr>")
                continue
            out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("# "):
            out.append(f"<h1>{esc[2:]}</h1>")
        elif line.startswith("## "):
            out.append(f"<h2>{esc[3:]}</h2>")
        elif line.startswith("- "):
            out.append(f"<li>{esc[2:]}</li>")
        elif line.startswith("![") and line.endswith(")"):
            src = html.escape(line[line.index("(") + 1:-1], quote=True)
            out.append(f'<p><img src="{src}" alt="{src}"></p>')
        elif line.strip():
            out.append(f"<p>{esc.replace('**', '')}</p>")
    if in_table:
        out.append("</table>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>prefstream demo report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def write_report(run: Any, data: dict[str, list[dict]], decisions: list[dict]) -> dict[str, Any]:
    out = Path(run.cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    report = build(run, data, decisions)
    images = plots(report, out)
    series = report.pop("_series")
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "series.json").write_text(json.dumps(series))
    md = markdown(report, images)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(to_html(md))
    return report


def summary(r: dict[str, Any]) -> str:
    nd, p = r["noise_detection"], r["pairs"]
    cur = [m for m in r["models"] if m["role"] == "current"]
    accs = " → ".join(f"{m['version'].split('-')[-1] if m['version'] != 'bootstrap' else 'bootstrap'} "
                      f"{m['holdout_accuracy']:.3f}" for m in cur)
    c = nd["corrected_or_filtered"]
    return (f"\n[bold]demo summary[/]: {p['scored']}/{p['streamed']} pairs scored, routes {dict(r['routes'])}\n"
            f"  clean-holdout accuracy by version: {accs}\n"
            f"  flipped labels found: precision {_f(c['precision'])}, recall {_f(c['recall'])} "
            f"(training-label accuracy {_f(nd['stream_label_accuracy'])} → {_f(nd['curated_label_accuracy'])})\n"
            f"  annotator alpha {_f(r['review']['alpha'])}; latency p50 {_f(r['latency_s']['p50'], '.2f')} s, "
            f"p99 {_f(r['latency_s']['p99'], '.2f')} s; hot-swaps "
            f"{[_f(s['first_scored_after_s'], '.1f') for s in r['hot_swaps']]} s\n"
            f"  report: {r['config']['out_dir']}/report.md (and .html, .json, PNGs)")
