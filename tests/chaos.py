"""`make chaos`: run the tests marked ``slow``: the long fault suite of tests/test_fault_suite.py (hostile
input with killed workers and review app, Redis restarts, and the poisoning attacks) and the full-size
runs whose small variants `make test` runs (tests/test_pipeline.py); then print the fault suite's tables
and write them to bench/results/chaos.json and bench/results/chaos.md.

    python -m tests.chaos [extra pytest args]

Each run of a fault test writes chaos-<name>.json into $PREFSTREAM_CHAOS_RESULTS (set here to a
scratch directory); this script gathers them. The exit status is pytest's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _n(v) -> str:
    return f"{v:,}" if isinstance(v, int) else str(v)


def render(results: list[dict]) -> str:
    """Markdown: one table per pipeline run and per poisoning run, one line per Redis run."""
    out = []
    for r in results:
        if r.get("kind") == "poisoning":
            out += _render_poisoning(r)
        elif "table" in r:
            cfg = r["config"]
            out.append(f"### Run `{r['name']}`: {cfg['good']:,} good + {cfg['hostile']:,} hostile records, "
                       f"{cfg['workers']} workers, {r['planned_worker_kills']} worker SIGKILLs, "
                       f"{len(r['review_kills'])} review-app SIGKILLs\n")
            out.append("| records | sent | dead-lettered | scored | deduplicated | lost | duplicated | wrong reason | extra copies |")
            out.append("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
            tot = dict.fromkeys(("sent", "dead_lettered", "scored", "deduplicated", "lost", "duplicated",
                                 "wrong_reason", "extra_copies"), 0)
            for row in r["table"]:
                out.append(f"| {row['class']} | " + " | ".join(_n(row[k]) for k in tot) + " |")
                for k in tot:
                    tot[k] += row[k]
            out.append("| **total** | " + " | ".join(f"**{_n(v)}**" for v in tot.values()) + " |")
            rv, sh, sc = r["review"], r["shards"], r["scored"]
            restarts = r["planned_worker_kills"] + len(r["unplanned_worker_exits"])
            out.append("")
            out.append(f"- worker restarts: {restarts} ({r['planned_worker_kills']} planned SIGKILL, "
                       f"{len(r['unplanned_worker_exits'])} unplanned exits); review app started {r['review_starts']} times")
            out.append(f"- prefs.scored: {sc['identities']:,} identities from {sc['records_read']:,} records read, "
                       f"{sc['n_unexpected']} unexpected; routes {sc['routes']}")
            out.append(f"- prefs.verified: {rv['tasks']:,} review tasks, {rv['verified']:,} verified "
                       f"({rv['by']}), lost {rv['n_lost']}, duplicated (conflicting labels) "
                       f"{len(rv['conflicting_labels'])}, extra copies {rv['extra_copies']}; "
                       f"{r['answered']:,} verdicts given")
            out.append(f"- shards: {sh['expected']:,} curated identities ({sh['gold']:,} gold), {sh['rows']:,} rows, "
                       f"lost {sh['lost']}, duplicated rows {sh['duplicated_rows']}, unexpected {sh['unexpected']}, "
                       f"incomplete files {sh['incomplete_files']}")
            out.append(f"- timings (s from start): {r['timings_s']}")
            for note in r.get("notes", []):
                out.append(f"- note: {note}")
            out.append("")
        else:
            out.append(f"### Run `{r['name']}`: Redis SIGKILLed mid-review twice "
                       f"({', '.join('wiped' if x['wiped'] else 'kept its AOF' for x in r['restarts'])})\n")
            out.append(f"- {r['tasks']} tasks, {r['verified']} verified, lost {len(r['lost'])}, conflicting "
                       f"{len(r['conflicting'])}, extra copies {r['extra_copies']}; {r['answered']} verdicts; "
                       f"{r['seconds']} s")
            out.append("")
    return "\n".join(out)


def _render_poisoning(r: dict) -> list[str]:
    """The poisoning run: one line per attack, what refused it and the shard rows it poisoned."""
    cfg, sv, hon, sh = r["config"], r["serving"], r["honest"], r["shards"]
    out = [f"### Run `{r['name']}`: every attack beside {cfg['honest']:,} honest pairs, one worker (shard writer), "
           "the review app (aggregator)\n",
           "| attack | sent | refused | refused by (reason) | poisoned shard rows |", "|---|--:|--:|---|--:|"]
    for row in r["attacks"]:
        out.append(f"| {row['attack']} | {row['sent']:,} | {row['refused']:,} | {row['reason']} | "
                   f"{row['poisoned_rows']:,} |")
    out.append(f"| **total** | **{sum(x['sent'] for x in r['attacks']):,}** | "
               f"**{sum(x['refused'] for x in r['attacks']):,}** | | **{r['poisoned_rows']:,}** |")
    after = sv["after"]
    out += ["",
            f"- serving: `{sv['versions']['v2']}` before and after (model info {after['info']:.0f}, current swaps "
            f"{sv['before']['swaps_current']:.0f} -> {after['swaps_current']:.0f}, gold swaps {after['swaps_gold']:.0f}); "
            f"the {sv['late_pairs']} pairs sent after the announcements were scored by {sv['late_versions']}",
            f"- honest traffic: {hon['pairs']:,} pairs, {hon['scored']:,} scored (routes {hon['routes']}), "
            f"{hon['verified']:,} verified by annotators, {hon['shard_rows']:,} shard rows; {r['answered']:,} verdicts",
            f"- shards: {sh['rows']:,} rows {sh['splits']}, rows of unknown pairs {len(sh['unknown_pairs'])}, "
            f"curated identities missing {len(sh['missing'])}",
            f"- timings (s from start): {r['timings_s']}", ""]
    return out


def main(argv: list[str]) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="prefstream-chaos-"))
    env = dict(os.environ, PREFSTREAM_CHAOS_RESULTS=str(scratch))
    started = time.monotonic()
    rc = subprocess.call([sys.executable, "-m", "pytest", "tests", "-m", "slow", "-p",
                          "no:cacheprovider", *argv], cwd=ROOT, env=env)
    results = [json.loads(p.read_text()) for p in sorted(scratch.glob("chaos-*.json"))]
    if not results:
        print("no fault run wrote results", file=sys.stderr)
        return rc or 1
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "chaos.json").write_text(json.dumps(results, indent=1, default=str))
    md = (f"# Fault suite (`make chaos`)\n\npytest exit status {rc}; {time.monotonic() - started:.0f} s\n\n"
          + render(results))
    (RESULTS / "chaos.md").write_text(md + "\n")
    print(md)
    print(f"\nwritten: {RESULTS / 'chaos.md'}, {RESULTS / 'chaos.json'}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
