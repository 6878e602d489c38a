"""CLI commands for running the whole system on one machine: generate, up, demo."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("generate")
@click.option("-n", "--pairs", "n", type=click.IntRange(min=1), default=1000, show_default=True, help="How many pairs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same pairs.")
@click.option("--flip-share", type=click.FloatRange(0, 1), default=0.2, show_default=True,
              help="Share of pairs published with chosen and rejected swapped (recorded in metadata.flipped).")
@click.option("--style-trap-share", type=click.FloatRange(0, 1), default=0.15, show_default=True,
              help="Share of pairs whose worse answer is longer and in markdown.")
@click.option("--category", "categories", multiple=True, help="Only these task types (repeatable; default all 12).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSONL file to write (default: standard output).")
def generate_cmd(n: int, seed: int, flip_share: float, style_trap_share: float, categories: tuple[str, ...],
                 out: Path | None) -> None:
    """Write demo preference pairs whose truth is known, as JSONL.

    Twelve task types: arithmetic, word problems, unit conversions, number comparison, letter
    counting, Python functions with tests, capitals, chemical symbols, translations, weekdays,
    safety requests and open-ended writing. metadata.truth says which side is really better,
    metadata.flipped marks the deliberately swapped labels. Pipe it into `prefstream produce -`.
    """
    from streams.generate import CATEGORIES, GenerateConfig, generate

    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise click.BadParameter(f"unknown {unknown}; choose from {', '.join(CATEGORIES)}", param_hint="--category")
    cfg = GenerateConfig(n=n, seed=seed, flip_share=flip_share, style_trap_share=style_trap_share,
                         categories=tuple(categories) or tuple(CATEGORIES))
    import json

    fh = out.open("w", encoding="utf-8") if out else sys.stdout
    try:
        for pair in generate(cfg):
            fh.write(json.dumps(pair, ensure_ascii=False) + "\n")
    finally:
        if out:
            fh.close()
    if out:
        click.echo(f"wrote {n} pairs to {out}", err=True)


def register(main: click.Group) -> None:
    from streams.demo import demo
    from streams.up import up

    for cmd in (generate_cmd, up, demo):
        main.add_command(cmd)
