"""Running the whole system on one machine: `prefstream generate`, `up` and `demo`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from streams.cli.common import BROKERS_HELP
from streams.local.demo import DemoConfig
from streams.local.generate import GenerateConfig


@click.command("generate")
@click.option("-n", "--pairs", "n", type=click.IntRange(min=1), default=GenerateConfig.n, show_default=True, help="How many pairs.")
@click.option("--seed", type=int, default=GenerateConfig.seed, show_default=True, help="Same seed, same pairs.")
@click.option("--flip-share", type=click.FloatRange(0, 1), default=GenerateConfig.flip_share, show_default=True,
              help="Share of pairs published with chosen and rejected swapped at random (metadata.noise = random).")
@click.option("--style-trap-share", type=click.FloatRange(0, 1), default=GenerateConfig.style_trap_share, show_default=True,
              help="Share of pairs whose worse answer is longer and in markdown.")
@click.option("--style-flip-share", type=click.FloatRange(0, 1), default=GenerateConfig.style_flip_share,
              show_default=True, help="Share of pairs whose worse answer is dressed longer and in markdown and published "
              "as chosen, as length-biased judges do (metadata.noise = style; only in task types without a checkable answer).")
@click.option("--confident-flip-share", type=click.FloatRange(0, 1), default=GenerateConfig.confident_flip_share,
              show_default=True, help="Share of pairs where, on an objective task, the wrong answer is stated confidently "
              "and published as chosen (metadata.noise = confident).")
@click.option("--noisy-source-share", type=click.FloatRange(0, 1), default=GenerateConfig.noisy_source_share,
              show_default=True, help="Share of pairs from one noisy source (source prefstream-generate-vendor-b, "
              "metadata.noise = source), whose labels are flipped at --noisy-source-flip-rate.")
@click.option("--noisy-source-flip-rate", type=click.FloatRange(0, 1), default=GenerateConfig.noisy_source_flip_rate,
              show_default=True, help="Share of the noisy source's labels that are flipped.")
@click.option("--category", "categories", multiple=True, help="Only these task types (repeatable; default all 12).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSONL file to write (default: standard output).")
def generate_cmd(n: int, seed: int, flip_share: float, style_trap_share: float, style_flip_share: float,
                 confident_flip_share: float, noisy_source_share: float, noisy_source_flip_rate: float,
                 categories: tuple[str, ...], out: Path | None) -> None:
    """Write demo preference pairs whose truth is known, as JSONL.

    Twelve task types: arithmetic, word problems, unit conversions, number comparison, letter
    counting, Python functions with tests, capitals, chemical symbols, translations, weekdays,
    safety requests and open-ended writing. metadata.truth says which side is really better,
    metadata.flipped marks the deliberately swapped labels and metadata.noise their kind (random,
    style, confident, source). Pipe it into `prefstream produce -`.
    """
    from streams.exceptions import ConfigError
    from streams.local.generate import CATEGORIES, generate

    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise click.BadParameter(f"unknown {unknown}; choose from {', '.join(CATEGORIES)}", param_hint="--category")
    cfg = GenerateConfig(n=n, seed=seed, flip_share=flip_share, style_trap_share=style_trap_share,
                         categories=tuple(categories) or tuple(CATEGORIES), style_flip_share=style_flip_share,
                         confident_flip_share=confident_flip_share, noisy_source_share=noisy_source_share,
                         noisy_source_flip_rate=noisy_source_flip_rate)
    try:
        cfg.validate()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    fh = out.open("w", encoding="utf-8") if out else sys.stdout
    try:
        for pair in generate(cfg):
            fh.write(json.dumps(pair, ensure_ascii=False) + "\n")
    finally:
        if out:
            fh.close()
    if out:
        click.echo(f"wrote {n} pairs to {out}", err=True)


DURABLE_HELP = (
    "Keep the embedded broker's topics, records and committed offsets in an embedded S3 object store (as "
    "`prefstream stack up --durable`; PREFSTREAM_DURABLE=true). A home started durable stays durable.")


@click.command("up")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes (they share the partitions of prefs.raw).")
@click.option("--review-port", type=int, default=None, help="Port of the review app (default PREFSTREAM_REVIEW_PORT, 8080).")
@click.option("--no-controller", is_flag=True, help="Do not run the retrain controller.")
@click.option("--refresh", type=float, default=1.0, show_default=True, help="Seconds between status updates.")
@click.option("--plain", is_flag=True, help="Status lines instead of the live view (the default when the output "
                                            "is not a terminal): a line when something changed, else every --every s.")
@click.option("--every", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="With --plain: seconds between lines when nothing changed (0: a line every --refresh).")
@click.option("--durable", is_flag=True, help=DURABLE_HELP + " The next `up` resumes where this one stopped.")
@click.option("--brokers", type=click.IntRange(1, 16), default=None, help=BROKERS_HELP)
def up(workers: int, review_port: int | None, no_controller: bool, refresh: float, plain: bool, every: float,
       durable: bool, brokers: int | None) -> None:
    """Run everything in the foreground with a live status; Ctrl-C stops it all cleanly.

    Publish pairs meanwhile with `prefstream produce FILE` (or `prefstream generate | prefstream
    produce --generator-key -`), and review them at the URL shown. Annotator tokens come from
    PREFSTREAM_REVIEW_TOKENS; when unset, one token is made up for this run and printed.
    """
    from streams.local.up import run_up

    run_up(workers, review_port, no_controller, refresh, plain, durable, brokers, every)


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=DemoConfig.out_dir,
              show_default=True, help="Where report.md, report.html, report.json and the plots go.")
@click.option("--pairs", type=click.IntRange(min=3), default=DemoConfig.pairs, show_default=True,
              help="Generated pairs to stream.")
@click.option("--hh-pairs", type=click.IntRange(min=0), default=DemoConfig.hh_pairs, show_default=True,
              help="Shared HH-RLHF pairs mixed in (when ../shared/data is present; 0 = none).")
@click.option("--seed-pairs", type=click.IntRange(min=10), default=DemoConfig.seed_pairs, show_default=True,
              help="Clean seed set (Stage 1).")
@click.option("--holdout-pairs", type=click.IntRange(min=10), default=DemoConfig.holdout_pairs, show_default=True,
              help="Clean holdout.")
@click.option("--flip-share", type=click.FloatRange(0, 1), default=DemoConfig.flip_share, show_default=True,
              help="Share of labels flipped at random (the demo also plants style-biased and confident-but-wrong "
                   "flips and a noisy source; see `prefstream generate --help`).")
@click.option("--retrains", type=click.IntRange(min=0), default=DemoConfig.retrains, show_default=True,
              help="Retrains to wait for.")
@click.option("--threshold", type=click.IntRange(min=0), default=DemoConfig.threshold,
              help="Curated pairs per retrain (default: a quarter of a phase).")
@click.option("--seed-steps", type=click.IntRange(min=1), default=DemoConfig.seed_steps, show_default=True)
@click.option("--retrain-epochs", type=click.FloatRange(min=0.1), default=DemoConfig.retrain_epochs, show_default=True,
              help="Passes over each retrain's pairs (it stops early on the gold validation slice).")
@click.option("--full-retrain-every", type=click.IntRange(min=0), default=DemoConfig.full_retrain_every,
              show_default=True, help="Every Nth retrain trains from Stage 1 on every curated pair; 0 = never.")
@click.option("--comparison-seeds", type=click.IntRange(min=1), default=DemoConfig.comparison_seeds, show_default=True,
              help="Seeds of the like-for-like comparison (each trains the raw, curated and truth arms).")
@click.option("--max-length", type=click.IntRange(min=16), default=DemoConfig.max_length, show_default=True)
@click.option("--rate", type=click.FloatRange(min=0.1), default=DemoConfig.rate, show_default=True,
              help="Pairs per second produced.")
@click.option("--max-in-flight", type=click.IntRange(min=1), default=DemoConfig.max_in_flight, show_default=True,
              help="Most pairs produced but not yet scored; the producer waits above it.")
@click.option("--workers", type=click.IntRange(1, 64), default=DemoConfig.workers, show_default=True)
@click.option("--time-limit", "time_limit_s", type=click.FloatRange(min=1), default=DemoConfig.time_limit_s,
              show_default=True, help="Seconds before the demo stops waiting for retrains.")
@click.option("--seed", type=int, default=DemoConfig.seed, show_default=True, help="Seed of the generated data.")
@click.option("--stream", type=click.Choice(["generated", "hh"]), default=DemoConfig.stream, show_default=True,
              help="generated: the generator's pairs (plus --hh-pairs HH-RLHF pairs); hh: HH-RLHF pairs alone "
                   "(../shared/data or --hh-file) with the same kinds of noise planted, truth = the published label.")
@click.option("--hh-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="HH-RLHF JSONL(.gz) to mix in or stream (default: ../shared/data/hh-rlhf-harmless-test.jsonl.gz).")
@click.option("--comparison/--no-comparison", default=DemoConfig.comparison, show_default=True,
              help="Prove curation like for like at the end: replay the served version's chain from its base on the "
                   "same pairs and steps with raw, curated and true labels (each seed), and run one batch training on "
                   "all curated pairs with the same compute (3 x seeds + 1 training runs).")
@click.option("--durable", is_flag=True, help=DURABLE_HELP)
@click.option("--brokers", type=click.IntRange(1, 16), default=None, help=BROKERS_HELP)
def demo(out_dir: Path, **kw: Any) -> None:
    """Run the whole system on this machine and write a report (what `make demo` runs).

    Streams generated pairs with known truth (about 20% wrong labels: random, style-biased,
    confident-but-wrong and from one noisy source) through the workers, simulated
    annotators review through the web app's API, the controller retrains and hot-swaps the reward
    model, then everything stops and demo-report/ gets report.md, report.html and plots.
    """
    from streams.local.demo import demo_main

    demo_main(DemoConfig(out_dir=out_dir, **kw))


COMMANDS = (generate_cmd, up, demo)
