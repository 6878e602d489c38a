"""The curation study (`python -m bench.curation`, part of `make bench`): does curation beat the raw stream?

For each data set, one `prefstream demo` run (comparison off) produces a served version whose chain trained
on curated labels; then the chain is replayed like for like (streams/local/curation.py) with raw, curated
and true labels, on several seeds, at two training lengths (``--lengths``): the chain's own steps and three times
them. Data sets: ``generated`` (the demo's stream, its default noise mix) and ``hh`` (HH-RLHF pairs from
../shared/data with the same kinds of noise planted; truth = the published HH label). Writes
bench/results/curation.json: per data set and length, each arm's mean and 95% interval (Student's t over
seeds) on each probe, and the paired gain of curated over raw.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import HH, RESULTS, write_result
from schemas.formats import read_objects
from trainers.exceptions import TrainerError

PROBES = ("clean_holdout", "non_trap", "style_traps", "confident_wrong")


def _run_demo(stream: str, args: argparse.Namespace, home: Path) -> Path:
    """One demo run without its own comparison; its state directory (models, stream, holdout, probe)."""
    from streams.local.demo import DemoConfig, run_demo
    from streams.settings import get_settings

    os.environ["PREFSTREAM_HOME"] = str(home)
    get_settings.cache_clear()
    cfg = DemoConfig(out_dir=home / "report", pairs=args.pairs, hh_pairs=0 if stream == "hh" else 120,
                     stream=stream, comparison=False, seed=args.seed, time_limit_s=args.time_limit)
    report = run_demo(cfg, get_settings())
    if report["failures"]:
        raise SystemExit(f"the {stream} demo failed: {report['failures']}")
    return next((home / "demo").iterdir())


def _read(path: Path) -> list[dict[str, Any]]:
    return read_objects(path)


def study(state: Path, lengths: list[float], seeds: list[int],
          on_length: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The like-for-like arms on the served chain of one demo's state, at each length (``on_length`` gets the
    result so far after each, so a long study that is stopped keeps the lengths it finished)."""
    from schemas.pairs import validate_pair
    from streams.local.curation import like_for_like, probes
    from trainers.storage.registry import ModelStore

    stream = _read(state / "stream.jsonl")
    # What the producers published is the stream file: the pair ids the topics carried, labels as sent.
    published = {p["pair_id"]: validate_pair(p) for p in stream}
    by_id = {p["pair_id"]: p for p in stream}
    sets = probes(_read(state / "holdout.jsonl"), _read(state / "probe.jsonl"))
    version = ModelStore(state / "models").serving("current")
    out: dict[str, Any] = {"version": version, "lengths": {}}
    for scale in lengths:
        started = time.time()
        like = like_for_like(state / "models", version, published, by_id, sets, seeds, scale=scale,
                             on_arm=lambda arm, seed, s=scale: print(f"  x{s:g}: arm {arm}, seed {seed}", flush=True))
        out["lengths"][f"x{scale:g}"] = {
            "steps": [round(link["kept_step"] * scale) for link in like["links"]], "links": like["links"],
            "pairs": like["pairs"], "pairs_curated_label_differs": like["pairs_curated_label_differs"],
            "arms": {a: {"mean": v["mean"], "ci95": v["ci95"], "per_seed": v["per_seed"]} for a, v in like["arms"].items()},
            "gain": {p: like["by_probe"][p] for p in PROBES}, "seconds": round(time.time() - started, 1)}
        if on_length:
            on_length(out)
    return out


def _cell(res: dict[str, Any], arm: str, probe: str) -> str:
    ci = res["arms"][arm]["ci95"][probe]
    return f"{res['arms'][arm]['mean'][probe]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def rows(r: dict[str, Any]) -> list[str]:
    """docs/benchmarks.md rows: each data set and length, the arms on the clean holdout and the probe."""
    out = []
    for name, ds in r["datasets"].items():
        for length, res in ds["lengths"].items():
            def cell(arm: str, probe: str, res: dict[str, Any] = res) -> str:
                return _cell(res, arm, probe)

            g = res["gain"]["clean_holdout"]
            gci = f" [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]" if g["ci95"] else ""
            share = f"{g['ceiling_share']:.2f}" if g["ceiling_share"] is not None else "-"
            out.append(f"| curation study, {name}, {length} ({sum(res['steps'])} steps, {res['pairs']} pairs, "
                       f"{len(r['seeds'])} seeds) | curated {cell('curated', 'clean_holdout')} | raw "
                       f"{cell('raw', 'clean_holdout')} | gain {g['mean']:+.3f}{gci} | 95% interval of the gain above 0 "
                       f"at the longer length | truth {cell('truth', 'clean_holdout')}; ceiling share {share}; "
                       f"confident-wrong probe raw {cell('raw', 'confident_wrong')} / curated "
                       f"{cell('curated', 'confident_wrong')}; style traps raw {cell('raw', 'style_traps')} / curated "
                       f"{cell('curated', 'style_traps')} |")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.curation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="generated,hh", help="Comma-separated: generated, hh.")
    ap.add_argument("--pairs", type=int, default=1800, help="Pairs each demo streams.")
    ap.add_argument("--seeds", type=int, default=3, help="Seeds per arm (each trains raw, curated and truth).")
    ap.add_argument("--lengths", default="1,3", help="Comma-separated training lengths, as multiples of the chain's "
                                                     "steps (1: the chain's own; 3: three times as long).")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the demo's data.")
    ap.add_argument("--time-limit", type=float, default=900.0, help="Each demo's time limit (s).")
    ap.add_argument("--state", action="append", default=[], metavar="NAME=DIR",
                    help="Study an existing demo state directory instead of running a demo for NAME.")
    args = ap.parse_args(argv)
    given = dict(s.split("=", 1) for s in args.state)
    seeds = list(range(args.seeds))
    try:
        lengths = [float(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--lengths takes numbers separated by commas, e.g. 1,3 (got {args.lengths!r})") from None
    result: dict[str, Any] = {"seeds": seeds, "datasets": {}}
    cmd = ("python -m bench.curation " + " ".join(argv if argv is not None else sys.argv[1:])).strip()

    def save(name: str, done: dict[str, Any]) -> None:
        # Written after every length: a run keeps the other data sets' results and the lengths of this data set
        # it did not run (each length says the command that made it), and a stopped run keeps what it finished.
        earlier = RESULTS / "curation.json"
        kept = json.loads(earlier.read_text()).get("datasets", {}) if earlier.exists() else {}
        # Each length names the served version it studied: lengths kept from another demo run studied another one.
        ran = {length: res | {"command": cmd, "version": done.get("version")} for length, res in done["lengths"].items()}
        result["datasets"][name] = done | {"lengths": kept.get(name, {}).get("lengths", {}) | ran}
        write_result("curation", result | {"datasets": kept | result["datasets"]}, cmd)

    for name in [d for d in args.datasets.split(",") if d]:
        if name == "hh" and not HH.exists() and name not in given:
            raise SystemExit(f"shared data not present: {HH}; the hh data set needs ../shared/data")
        print(f"curation study: {name}", flush=True)
        state = Path(given[name]) if name in given else _run_demo(name, args, Path(tempfile.mkdtemp(prefix="bench-cur-")))
        try:
            study(state, lengths, seeds, on_length=lambda done, n=name: save(n, done))
        except TrainerError as exc:
            raise SystemExit(f"curation study, {name} (demo state {state}): {exc}") from None
    return result


if __name__ == "__main__":
    main()
