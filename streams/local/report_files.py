"""The demo report's files: report.json, report.md, report.html and the PNG plots, and the summary
printed at the end of `prefstream demo`. The numbers come from ``streams.local.report.build``."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from streams.local.report import HOT_SWAP_TARGET_S, build
from streams.review import audit
from trainers.evaluation.evaluate import reliability_table
from trainers.storage.registry import BOOTSTRAP_VERSION


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

    files: list[str] = []
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

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([0.5, 1], [0.5, 1], color="grey", ls=":", lw=0.8, label="perfectly calibrated")
    for m in cur:
        bins = [b for b in m["calibration"]["reliability"] if b["count"]]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", ms=3,
                label=f"{m['version']} (T {m['calibration']['temperature']:.2g})")
    ax.set_xlabel("confidence max(p, 1 - p)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability on the clean holdout")
    ax.legend(fontsize=6, loc="lower right")
    _save(fig, out / "reliability.png", files)

    series = report["_series"]["routes"]
    if series:
        t0 = min(t for t, _ in series)
        kinds = sorted({r for _, r in series})
        edges = np.arange(0, max(t for t, _ in series) - t0 + 10, 10)
        fig, ax = plt.subplots(figsize=(7, 3.5))
        counts = [np.histogram([t - t0 for t, r in series if r == k], bins=edges)[0] for k in kinds]
        ax.stackplot(edges[:-1], counts, labels=kinds)
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


def _fmt(v: Any, fmt: str = ".3f") -> str:
    """A number for a table cell: '-' for missing, floats to ``fmt``."""
    return "-" if v is None else format(v, fmt) if isinstance(v, float) else str(v)


def hot_swap_rows(swaps: list[dict[str, Any]]) -> list[str]:
    """One table row per hot-swap: the time to the first pair scored by the version, against its target."""
    rows = []
    for sw in swaps:
        after, target = sw["first_scored_after_s"], sw.get("target_s")
        met = "" if sw.get("within_target") is None else ("met" if sw["within_target"] else "missed")
        rows.append(f"| {sw['version']} | {f'{after:.2f} s' if after is not None else 'no traffic after it'} | "
                    f"{f'< {target:g} s {met}'.strip() if target else '-'} |")
    return rows


def model_rows(models: list[dict[str, Any]], ece_by_version: dict[str, float | None]) -> list[str]:
    """One table row per model version: accuracy on the clean holdout, its temperature and its calibration error."""
    rows = []
    for m in models:
        note = "rolled back live by the controller" if m.get("rolled_back") else ""
        cal = m["calibration"]
        rows.append(f"| {m['version']} | {m.get('parent') or '-'} | {m.get('backend', 'torch')} | "
                    f"{_fmt(m['holdout_accuracy'])} | {_fmt(m['style_trap_accuracy'])} | {cal['temperature']:.3g} | "
                    f"{_fmt(ece_by_version.get(m['version']))} | {_fmt(cal['ece_uncalibrated'])} | {note} |")
    return rows


def target_rows(targets: list[dict[str, Any]]) -> list[str]:
    """One table row per target: what it measures, the measured value, the bound and whether it was met."""
    verdict = {True: "met", False: "missed", None: "not measured"}
    return [f"| {t['what']} | {_fmt(t['value'])} | {t['target']} | {verdict[t['met']]} |" for t in targets]


PROBE_NAMES = (("clean_holdout", "clean holdout"), ("non_trap", "non-trap"), ("style_traps", "style traps"),
               ("confident_wrong", "confident-wrong probe"))


def _ci(ci: list[float] | None) -> str:
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def like_for_like_lines(like: dict[str, Any] | None, batch: dict[str, Any] | None) -> list[str]:
    """The arms replayed on the served chain (mean [95% interval] over seeds), the paired gains and the batch run."""
    if like is None:
        return ["No like-for-like comparison: it was switched off (--no-comparison) or no retrained version served.", ""]
    arms = like["arms"]
    lines = ["| arm | " + " | ".join(n for _, n in PROBE_NAMES) + " |", "|---" * (len(PROBE_NAMES) + 1) + "|"]
    for arm, what in (("raw", "raw (labels as published)"), ("curated", "curated (labels as in the shards)"),
                      ("truth", "truth (the ceiling)")):
        lines.append(f"| {what} | " + " | ".join(_fmt(arms[arm]["mean"][k]) + _ci(arms[arm]["ci95"][k])
                                                  for k, _ in PROBE_NAMES) + " |")
    g = like["by_probe"]
    lines.append("| gain, curated - raw (paired) | " + " | ".join(_fmt(g[k]["mean"]) + _ci(g[k]["ci95"])
                                                                    for k, _ in PROBE_NAMES) + " |")
    lines.append("| share of the ceiling recovered | " + " | ".join(_fmt(g[k]["ceiling_share"]) for k, _ in PROBE_NAMES)
                 + " |")
    links = ", ".join(f"{lk['mode']} on {lk['pairs']} pairs, {lk['kept_step']} of {lk['planned_steps']} steps kept"
                      for lk in like["links"])
    lines += ["", f"Each arm starts from {like['base']} and replays the chain of {like['version']} ({links}) on the same "
              f"{like['pairs']} pair ids with the same recipe and steps; only the labels differ "
              f"({like['pairs_curated_label_differs']} curated labels differ from the published ones). Seeds "
              f"{like['seeds']}, each run for every arm; intervals are 95% over seeds. The confident-wrong probe holds "
              "objective pairs whose wrong answer is stated confidently, as the rejected side: the bias the confident "
              "noise plants, which the clean holdout cannot see.", ""]
    if batch:
        lines += [f"Loop against batch: the served version {_fmt(batch['served'])}, one training from {batch['base']} "
                  f"on all {batch['pairs']} curated pairs with the chain's {batch['steps']} steps "
                  f"{_fmt(batch['batch'])} (gap {_fmt(batch['gap'])}) on the clean holdout.", ""]
    return lines


def curation_lines(r: dict[str, Any]) -> list[str]:
    """Like for like, label precision, human effort beside model accuracy, and the targets."""
    hv = r["human_verdicts"]
    lines = ["## Curation against the raw stream, like for like", ""]
    lines += like_for_like_lines(r.get("like_for_like"), r.get("loop_vs_batch"))
    gain_target = next((t for t in r["targets"] if t["name"] == "curation_gain"), None)
    if gain_target and gain_target["met"] is False:
        nd = r["noise_detection"]
        lines += [f"The gain is below its target. Measured: the published labels are {_fmt(nd['stream_label_accuracy'])} "
                  f"right, the curated ones {_fmt(nd['curated_label_accuracy'])}; the per-probe gains above show where "
                  "the label difference reached the model at the chain's length of training.", ""]
    lines += ["| phase | serving version | its clean-holdout acc. | human share | to review: mispredicted / uncertain "
              "| published labels wrong | reviews the gold model kept from a flip |", "|---|---|---|---|---|---|---|"]
    for ph in r["phases"]:
        why = ph.get("review_share_by_reason")
        split = "-" if why is None else f"{_fmt(why.get('mispredicted', 0.0), '.2f')} / {_fmt(why.get('uncertain', 0.0), '.2f')}"
        lines.append(f"| {ph['phase']} | {ph.get('serving_version') or '-'} | {_fmt(ph.get('model_accuracy'))} | "
                     f"{_fmt(ph['human_share'], '.2f')} | {split} | "
                     f"{_fmt(ph.get('wrong_label_share'), '.2f')} | {ph.get('review_flip_blocked_by_gold', '-')} |")
    lines += ["", "A pair whose published label is wrong reaches the shards corrected only through a person or a flip, and "
              "a flip needs the gold model to agree too: the wrong labels are the part of the human share that a "
              "better served model alone does not remove; the uncertain share is the part it does.", ""]
    lines += [f"Label precision against the generator's truth: silver {_fmt(r['silver_precision'])}, flipped "
              f"{_fmt(r['flipped_precision'])}. Human verdicts: {hv['verdicts']} for {hv['curated_pairs']} curated pairs "
              f"({_fmt(hv['per_curated_pair'], '.2f')} per curated pair, {_fmt(hv['per_human_curated_pair'], '.2f')} per "
              f"pair curated by review). Share of pairs routed to human review by phase: "
              + ", ".join(_fmt(x, ".2f") for x in r["human_share_by_phase"]) + ".", ""]
    kinds = r["noise_detection"].get("by_kind") or {}
    if kinds:
        lines += ["| planted noise | wrong labels | corrected or filtered | recall |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['wrong_labels']} | {v['caught']} | {_fmt(v['recall'])} |" for k, v in sorted(kinds.items())]
        lines.append("")
    lines += ["### Targets", "", "| target | measured | bound | |", "|---|---|---|---|"] + target_rows(r["targets"]) + [""]
    return lines


def markdown(r: dict[str, Any], images: list[str]) -> str:
    noise, p = r["noise_detection"], r["pairs"]
    lines = ["# prefstream demo report", "", f"Generated {r['generated_at']}; topics `{r['topic_prefix']}*`.", ""]
    if r["failures"]:
        lines += ["**Failed stages:**", ""] + [f"- {f}" for f in r["failures"]] + [""]
    if r.get("warnings"):
        lines += ["**Warnings:**", ""] + [f"- {w}" for w in r["warnings"]] + [""]
    if r.get("plan"):
        pl = r["plan"]
        lines += [f"Plan (sized from Stage 1's speed): {pl['retrains']} retrain(s), {pl['retrains'] + 1} phases of "
                  f"{pl['phase_size']} pairs, a retrain after {pl['threshold']} new curated pairs, estimated "
                  f"{pl['retrain_estimate_s']:.0f} s each" + (f" ({pl['note']})" if pl.get("note") else "") + ".", ""]
    lines += ["## Pairs", "", "| streamed | generated | HH-RLHF | scored | missing | dead letters |", "|---|---|---|---|---|---|",
              f"| {p['streamed']} | {p['generated']} | {p['hh_rlhf']} | {p['scored']} | {p['missing']} | {p['dead_letters']} |",
              "", "Routes: " + ", ".join(f"{k} {v}" for k, v in sorted(r["routes"].items())),
              "", "Curated (training shards): " + ", ".join(f"{k} {v}" for k, v in sorted(r["curated_by_split"].items())), ""]
    if r.get("kept_out"):
        lines += ["Kept out of training before routing: " + ", ".join(f"{k} {v}" for k, v in r["kept_out"].items())
                  + " (content repeats dead-lettered; prompts of PREFSTREAM_DECONTAMINATE files scored, routed nowhere).", ""]
    lines += ["## Model versions (clean holdout)", "",
              "| version | parent | backend | holdout acc. | style-trap acc. | temperature | ECE | ECE at T = 1 | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += model_rows(r["models"], r["ece_by_version"])
    lines += ["", f"Holdout: {r['models'][0]['holdout_pairs']} clean generated pairs, {r['models'][0]['style_trap_pairs']} "
              "of them style traps (the worse answer longer and in markdown). The latest retrained version that was not "
              f"rolled back beats the initial one: **{'yes' if r['retrained_beats_initial'] else 'no'}**. Temperature: "
              "the version's calibration, fitted on its gold holdout when it was published; the scorers report "
              "p = sigmoid(margin / temperature). ECE: expected calibration error of that p on this holdout.", ""]
    final = next(m for m in reversed(r["models"]) if not m.get("rolled_back"))
    lines += [f"Reliability of {final['version']}:", "", reliability_table(final["calibration"])]
    lines += ["## Flipped-label detection", "",
              f"{noise['flipped_in_stream']} of {noise['pairs_with_known_truth']} generated pairs had their label flipped on purpose.", "",
              "| detection | flagged | correct | precision | recall |", "|---|---|---|---|---|"]
    for name, key in (("label corrected (human review, verifiers, recycling)", "corrected"),
                      ("corrected or removed by the gold consistency filter", "corrected_or_filtered")):
        d = noise[key]
        lines.append(f"| {name} | {d['flagged']} | {d['true_positives']} | {_fmt(d['precision'])} | {_fmt(d['recall'])} |")
    lines += ["", "Corrections by split: " + ", ".join(f"{k} {v}" for k, v in sorted(noise["corrected_by_split"].items())),
              "", f"Label accuracy: {_fmt(noise['stream_label_accuracy'])} as published, {_fmt(noise['curated_label_accuracy'])} in "
              f"the training shards ({noise['curated_pairs_with_known_truth']} pairs).", ""]
    lines += curation_lines(r)
    review = r["review"]
    lines += ["## Human review", "", f"{review['verdicts']} verdicts on {review['tasks']} tasks ({review['expert_verdicts']} by experts); "
              f"Krippendorff's alpha {_fmt(review['alpha'])} (simulated annotators, accuracy {r['config']['annotator_accuracy']}).", ""]
    if review.get("alpha_by_category"):
        re = review["reannotation"]
        lines += [f"Blind re-annotations agreeing with their task's majority: {_fmt(re['agreement'])} of {re['answers']}.", "",
                  "| task category | alpha |", "|---|---|"]
        lines += [f"| {c} | {_fmt(a)} |" for c, a in review["alpha_by_category"].items()] + [""]
    tput, lat = r["throughput"], r["latency_s"]
    lines += ["## Throughput and latency", "", f"Scored {_fmt(tput['scored_per_s_overall'], '.1f')} pairs/s over the run "
              f"(busiest 10 s: {_fmt(tput['scored_per_s_peak_10s'], '.1f')}/s; produced at up to {tput['produce_rate']}/s with at most {tput['max_in_flight']} pairs in flight). "
              f"Produce to prefs.scored: p50 {_fmt(lat['p50'], '.3f')} s, p99 {_fmt(lat['p99'], '.3f')} s over {lat['n']} records.", ""]
    lines += ["| phase | pairs | seconds | scored per s | human review share | p50 latency | p99 latency | retraining alongside |",
              "|---|---|---|---|---|---|---|---|"]
    for ph in r["phases"]:
        lines.append(f"| {ph['phase']} | {ph['pairs']} | {ph['seconds']} | {_fmt(ph['pairs_per_s'], '.2f')} | "
                     f"{_fmt(ph.get('human_share'), '.2f')} | "
                     f"{_fmt(ph['p50_s'], '.2f')} s | {_fmt(ph['p99_s'], '.2f')} s | {'yes' if ph['training_alongside'] else 'no'} |")
    lines += ["", "## Hot-swaps", "", "Versions the controller published, from the announcement on models.versions to the "
              "first pair the workers scored with it (traffic never paused; the load, verification and a warm-up batch "
              "happen in the background, the swap between two batches).", "",
              "| version | first pair scored by it after | target |", "|---|---|---|"]
    lines += hot_swap_rows(r["hot_swaps"])
    lines += audit_rows(r["audits"])
    lines += ["", "## Controller decisions", ""]
    lines += [f"- {time.strftime('%H:%M:%S', time.localtime(d['time']))} {d['role']}: {d['decision']} — {d['reason']}"
              for d in r["controller"]]
    lines += ["", "## Stages", ""] + [f"- {k}: {v:.0f} s" for k, v in r["stage_seconds"].items()] + [""]
    lines += [f"![{i}]({i})" for i in images]
    return "\n".join(lines) + "\n"


def _expansion_line(n: dict[str, Any] | None) -> str:
    """The summary line of the error-driven expansion (report.neighbour_expansion); empty for older reports."""
    if not n:
        return ""
    return (f"  neighbours of corrected errors sent to review: {n['tasks']}, {n['planted_noise']} of them planted "
            f"noise, {n['planted_noise_corrected']} of those corrected by the humans\n")


def audit_rows(a: dict[str, Any]) -> list[str]:
    """The audits section: per kind and category, the human majority against the automatic label."""
    lines = ["", "## Audits of automatic curation", "",
             f"Silver, flipped and verified_by_tool pairs sent to review blind (PREFSTREAM_WORKER_AUDIT_SHARE); {a['tasks_answered']} "
             "answered. Precision: the share of decided audits whose automatic label the human majority confirmed; "
             "the controller moves tau per category by the silver precision (tau moves are among its decisions).", "",
             "| kind | category | right | wrong | split | precision |", "|---|---|---|---|---|---|"]
    for kind, per in a["by_kind"].items():
        lines += [f"| {kind} | {cat} | {c['right']} | {c['wrong']} | {c['split']} | {_fmt(c['precision'])} |"
                  for cat, c in per.items()]
    return lines


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
    noise, p = r["noise_detection"], r["pairs"]
    cur = [m for m in r["models"] if m["role"] == "current"]
    accs = " → ".join(f"{m['version'].split('-')[-1] if m['version'] != BOOTSTRAP_VERSION else BOOTSTRAP_VERSION} "
                      f"{m['holdout_accuracy']:.3f}" for m in cur)
    eces = " → ".join(_fmt(r["ece_by_version"].get(m["version"])) for m in cur)
    c = noise["corrected_or_filtered"]
    return (f"\n[bold]demo summary[/]: {p['scored']}/{p['streamed']} pairs scored, routes {dict(r['routes'])}\n"
            f"  clean-holdout accuracy by version: {accs}\n"
            f"  calibration error (ECE) by version: {eces}\n"
            f"  like for like on the clean holdout: raw {_fmt(r['raw_trained_accuracy'])}, curated "
            f"{_fmt((r['raw_vs_curated']['curated'] or {}).get('holdout_accuracy'))}, gain "
            f"{_fmt(r['raw_vs_curated']['gain'])}; served {_fmt(r['curated_accuracy'])} vs batch "
            f"{_fmt((r.get('loop_vs_batch') or {}).get('batch'))}; "
            f"silver precision {_fmt(r['silver_precision'])}, flipped {_fmt(r['flipped_precision'])}; human share by phase "
            f"{[_fmt(x, '.2f') for x in r['human_share_by_phase']]}\n"
            f"  targets met: {sum(t['met'] is True for t in r['targets'])}/{len(r['targets'])}"
            + "".join(f"; missed {t['name']} ({_fmt(t['value'])}, {t['target']})" for t in r["targets"] if t["met"] is False)
            + "\n"
            f"  flipped labels found: precision {_fmt(c['precision'])}, recall {_fmt(c['recall'])} "
            f"(training-label accuracy {_fmt(noise['stream_label_accuracy'])} → {_fmt(noise['curated_label_accuracy'])})\n"
            f"  audited precision: {audit.headline(r['audits']['by_kind'])}\n"
            + _expansion_line(r.get("neighbour_expansion")) +
            f"  annotator alpha {_fmt(r['review']['alpha'])}; latency p50 {_fmt(r['latency_s']['p50'], '.2f')} s, "
            f"p99 {_fmt(r['latency_s']['p99'], '.2f')} s; hot-swaps "
            f"{[_fmt(s['first_scored_after_s'], '.2f') for s in r['hot_swaps']]} s (target < {HOT_SWAP_TARGET_S:g} s)\n"
            f"  report: {r['config']['out_dir']}/report.md (and .html, .json, PNGs)")
