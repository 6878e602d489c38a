"""Model-side commands: `prefstream train`, `retrain`, `eval` and `export`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from streams.cli.common import console
from streams.cli.models import announcer
from streams.exceptions import ConfigError
from streams.settings import get_settings
from trainers.evaluation.benchmarks import EVAL_FORMATS


def _dataclass_options(cls: type) -> Any:
    """Click options generated from a dataclass config, each with the field's help text."""

    def decorate(fn: Any) -> Any:
        for f in reversed(dataclasses.fields(cls)):
            if f.name == "train_files":
                continue
            name = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else None
            help_text = f.metadata.get("help", "")
            if f.type in ("bool", bool):
                fn = click.option(f"{name}/--no-{f.name.replace('_', '-')}", f.name, default=default, show_default=True,
                                  help=help_text)(fn)
            elif f.type in ("list[str]",):
                fn = click.option(name, f.name, multiple=True, help=help_text)(fn)
            elif "choices" in f.metadata:
                fn = click.option(name, f.name, type=click.Choice(list(f.metadata["choices"])), default=default,
                                  show_default=True, help=help_text)(fn)
            else:
                typ = {"int": int, "float": float, "str": str}.get(str(f.type), str)
                fn = click.option(name, f.name, type=typ, default=default, show_default=True, help=help_text)(fn)
        return fn

    return decorate


def _train_command() -> click.Command:
    from trainers.training.train import TrainConfig

    @click.command("train")
    @click.option("--data", "-d", "data", multiple=True, required=True,
                  help="Training data: shard directories or files (*.avro), or JSONL (ours, HH-RLHF). Repeatable.")
    @click.option("--limit", type=int, default=None, help="Use at most this many pairs (quick runs).")
    @_dataclass_options(TrainConfig)
    def train_cmd(data: tuple[str, ...], limit: int | None, **kwargs: Any) -> None:
        """Train a Bradley-Terry reward model on preference pairs.

        Writes the model (safetensors), metrics.json and curve.png to --output-dir. Start from the
        packaged MiniLM (--base-model default) or warm-start from any model directory.

        Large models: --precision bf16, --gradient-checkpointing, --lora-r 16 (the adapters are merged
        into the saved model), --tokens-per-step, --checkpoint-every N and --resume-from latest. On
        several GPUs run it under `torchrun --standalone --nproc_per_node=N -m streams.cli train ...`:
        each rank trains on its share of every step and rank 0 writes the output.
        """
        from trainers.training.data import read_pairs
        from trainers.training.distributed import ranks
        from trainers.training.train import train

        kwargs["eval_files"] = list(kwargs.get("eval_files") or [])
        cfg = TrainConfig(train_files=list(data), **kwargs)
        cfg.validate()
        skipped: list[str] = []
        pairs = read_pairs(cfg.train_files, skipped)
        if limit:
            pairs = pairs[:limit]
        main = ranks().is_main  # under torchrun rank 0 alone reports
        if main:
            console.print(f"training on {len(pairs)} pairs from {', '.join(data)}")
        if skipped and main:
            console.print(f"[yellow]skipped {len(skipped)} unusable records[/], the first: {skipped[0]}")
        result = train(cfg, pairs)
        if not main:
            return
        m = result.metrics
        console.print(f"[green]done[/]: {m['steps']} steps, {m['pairs_per_second']:.1f} pairs/s, loss "
                      f"{m['first_loss']:.4f} -> {m['final_loss']:.4f}, held-out accuracy {m['eval_accuracy']:.4f}")
        click.echo(str(result.output_dir))

    return train_cmd


def best_onnx_file(model: Path) -> str:
    """The fastest checked ONNX file of a model directory: INT8 when its export kept it, else fp32."""
    from trainers.scoring.model import ONNX_FP32, ONNX_INT8

    for name in (ONNX_INT8, ONNX_FP32):
        if (model / name).exists():
            return name
    raise ConfigError(f"{model} has no {ONNX_INT8} or {ONNX_FP32}; run `prefstream export {model} -d PAIRS` first, "
                      "or evaluate with --backend torch")


@click.command("eval")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "-d", "files", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
              help="Benchmark file(s): JSONL, a JSON array (RM-Bench, RMB), optionally .gz. Repeatable.")
@click.option("--format", "fmt", default="auto", show_default=True, type=click.Choice(["auto", *EVAL_FORMATS]),
              help="File layout; auto detects it per record.")
@click.option("--backend", type=click.Choice(["torch", "onnx"]), default="torch", show_default=True,
              help="onnx scores with model.int8.onnx when the export kept it, else model.onnx.")
@click.option("--device", default="auto", show_default=True,
              help="Where torch scores: auto (cuda when torch sees a GPU), cpu, cuda or cuda:N. ONNX runs on the CPU.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="Precision on the GPU: auto is bf16 where supported, else fp16. The CPU takes auto or fp32 only.")
@click.option("--limit", type=int, default=None, help="Evaluate at most this many items per file.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write report.json and report.md here.")
def eval_cmd(model: Path, files: tuple[Path, ...], fmt: str, backend: str, device: str, dtype: str, limit: int | None,
             out: Path | None) -> None:
    """Evaluate a reward model: pairwise accuracy, per category, Best-of-N, style bias, RM-Bench, calibration.

    Prints a markdown table and, for pairs, the reliability diagram and the expected calibration error
    (ECE) of p = sigmoid(margin / T) at the version's own temperature (from its manifest; 1 for a model
    directory without one) and uncalibrated. --out also writes report.json and report.md.
    """
    from trainers.evaluation.evaluate import evaluate, markdown_table, read_eval_items, reliability_table
    from trainers.scoring.model import RewardModel

    items: list[dict] = []
    skipped = 0
    for f in files:
        got, sk = read_eval_items(f, fmt, limit)
        items.extend(got)
        skipped += sk
    from trainers.scoring.devices import cpu_dtype_refusal, resolve_device

    device = resolve_device("cpu" if backend == "onnx" and device == "auto" else device)
    if refusal := cpu_dtype_refusal(dtype, device, "--dtype"):
        raise ConfigError(refusal)
    rm = (RewardModel.load(model, backend=backend, device=device, dtype=dtype, onnx_file=best_onnx_file(model))
          if backend == "onnx" else RewardModel.load(model, backend=backend, device=device, dtype=dtype))
    with console.status(f"scoring {len(items)} items"):
        report = evaluate(rm, items, rm.temperature)
    report["skipped_lines"] = skipped
    report["model"] = str(model)
    table = markdown_table(report)
    if "calibration" in report:
        table += "\n" + reliability_table(report["calibration"])
    click.echo(table)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "report.md").write_text(f"# Evaluation of {model}\n\n{table}")
        console.print(f"wrote {out / 'report.json'} and {out / 'report.md'}")


@click.command("export")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "-d", "files", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
              help="Validation pairs for the torch-vs-ONNX agreement check (JSONL, HH-RLHF or shards).")
@click.option("--limit", type=int, default=500, show_default=True, help="Validation pairs to use.")
@click.option("--quantize/--no-quantize", default=True, show_default=True,
              help="Also write model.int8.onnx: dynamic INT8 after SmoothQuant scaling calibrated on the "
                   "validation pairs. It is checked like model.onnx; below --min-agreement the export fails.")
@click.option("--min-agreement", type=float, default=0.995, show_default=True,
              help="Fail if decisions agree with torch on fewer than this share of pairs.")
def export_cmd(model: Path, files: tuple[Path, ...], limit: int, quantize: bool, min_agreement: float) -> None:
    """Export MODEL to ONNX (dynamic batch and sequence axes) and dynamic INT8, checked against torch."""
    from trainers.export.onnx import export
    from trainers.training.data import read_pairs

    pairs = read_pairs(list(files))[:limit]
    with console.status("exporting and checking agreement"):
        rep = export(model, pairs, quantize=quantize, min_agreement=min_agreement)
    console.print(f"[green]exported[/] {rep.fp32_path} (agreement {rep.agreement_fp32:.2%}, max |diff| "
                  f"{rep.max_abs_diff_fp32:.2e})" + (f" and {rep.int8_path} (agreement {rep.agreement_int8:.2%})"
                                                     if rep.int8_path else "") + f" on {rep.validation_pairs} pairs")


def _retrain_command() -> click.Command:
    from trainers.retrain import RetrainConfig

    @click.command("retrain")
    @click.option("--announce/--no-announce", default=True, show_default=True,
                  help="Announce a published version on models.versions.")
    @_dataclass_options(RetrainConfig)
    def retrain_cmd(announce: bool, **kwargs: Any) -> None:
        """Retrain a role from the shards, gate it against the serving model, export, publish, announce.

        With --seed-file, train the first current and gold versions from a verified seed set.
        The last line printed is RETRAIN_RESULT {json}: what the job runners read. Under torchrun
        (`torchrun --standalone --nproc_per_node=N -m streams.cli retrain ...`, what a Job with
        several GPUs runs) every rank trains and rank 0 alone evaluates, publishes and prints.
        """
        from dataclasses import asdict

        from streams.runtime.jobs import RESULT_PREFIX
        from trainers.retrain import run_retrain, run_seed
        from trainers.training.distributed import ranks

        settings = get_settings()  # the store and shards the services use, unless given here
        kwargs["shards_dir"] = kwargs.get("shards_dir") or settings.shards_location
        kwargs["shards_cache_dir"] = kwargs.get("shards_cache_dir") or str(settings.shards_mirror_dir)
        kwargs["models_dir"] = kwargs.get("models_dir") or settings.models_url or str(settings.models_dir)
        kwargs["models_cache_dir"] = kwargs.get("models_cache_dir") or str(settings.models_cache_dir
                                                                           or settings.home / "model-cache")
        kwargs["s3_endpoint"] = kwargs.get("s3_endpoint") or settings.s3_endpoint
        cfg = RetrainConfig(**kwargs)
        ann = announcer(announce)
        results = run_seed(cfg, ann) if cfg.seed_file else [run_retrain(cfg, ann)]
        if not ranks().is_main:
            return
        for r in results:
            colour = {"published": "green", "gate_failed": "yellow"}.get(r.decision, "white")
            console.print(f"[{colour}]{r.role}: {r.decision}[/] {r.version or ''} - {r.reason}", highlight=False)
        click.echo(RESULT_PREFIX + json.dumps([asdict(r) for r in results] if len(results) > 1 else asdict(results[0])))

    return retrain_cmd



COMMANDS = (_train_command(), _retrain_command(), eval_cmd, export_cmd)
