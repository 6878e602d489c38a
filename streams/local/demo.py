"""`prefstream demo` (behind `make demo`): the whole system doing its real job, with a report.

1. Starts the stack (the embedded one unless the configured broker and Redis answer).
2. Generates pairs whose truth is known (`prefstream generate`), about 20% with wrong labels (random,
   style-biased, confident-but-wrong and from one noisy source), plus the
   shared HH-RLHF pairs when ``../shared/data`` is present; a clean seed set and a clean holdout.
3. Stage 1: the first current and gold models from the seed set.
4. Starts the workers, the review app and the controller; simulated annotators answer review tasks
   through the review app's HTTP API; pairs stream in phases, and each phase waits (with a trickle
   of traffic, so the hot-swap is observed under load) until the controller has retrained and the
   workers serve the new version.
5. Stops everything and writes ``demo-report/`` (report.md, report.html, report.json, PNGs) from
   the records in the topics; prints a summary; exits non-zero if a stage failed.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from streams.embedded.process import free_port
from streams.embedded.stack import with_brokers
from streams.exceptions import StreamsError
from streams.kafka import topics
from streams.local.curation import RETRAIN_FREEZE_LAYERS
from streams.local.generate import GenerateConfig, as_clean, generate, write_jsonl
from streams.local.services import Deployment
from streams.local.status import controller_decisions
from streams.local.supervisor import describe_exit
from streams.settings import Settings, child_env, get_settings

console = Console(stderr=True, soft_wrap=True)  # log lines stay whole when not on a terminal
log = logging.getLogger(__name__)
REGRESSION_PAIRS = 100
SHARED_HH = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf-harmless-test.jsonl.gz"


class DemoError(StreamsError):
    """A stage of the demo failed; the message says which and where its log is."""


# A demo retrain step (beside the worker, one thread each) takes about 1.4 times as long as a Stage 1 step
# (seed_steps steps for each of two models, every core): 35 s against 19 s for 20 and 15 steps on a 2-core
# machine. The plan scales Stage 1's measured time by it.
RETRAIN_PER_SEED_STEP = 1.4
# Retrains are sized to their data (epochs over the curated pairs): about this share of the streamed pairs
# is curated (the rest waits for review or is dropped), in batches of the retrain's batch size.
CURATED_SHARE = 0.75
RETRAIN_BATCH = 16
# The longest the demo trickles for one retrain to serve: this many times its estimate, at least MIN.
RETRAIN_WAIT_FACTOR = 3.0
MIN_RETRAIN_WAIT_S = 60.0
# Time the plan keeps for starting the services, draining the queue and writing the report.
PLAN_MARGIN_S = 60.0


@dataclass
class DemoPlan:
    """How the stream is cut into phases, sized from the speed Stage 1 measured."""

    retrains: int
    phase_size: int
    threshold: int  # new curated pairs that trigger a retrain
    retrain_estimate_s: float
    retrain_wait_s: float  # longest the demo trickles for one retrain before it streams on
    expected_s: float  # streaming time the plan expects
    note: str = ""

    def describe(self, rate: float) -> str:
        return (f"plan: {self.retrains} retrain(s), {self.retrains + 1} phases of {self.phase_size} pairs at {rate:g}/s; "
                f"a retrain after {self.threshold} new curated pairs, about {self.retrain_estimate_s:.0f} s each "
                f"(from Stage 1's speed; waited for up to {self.retrain_wait_s:.0f} s); about "
                f"{self.expected_s / 60:.1f} min of streaming" + (f" ({self.note})" if self.note else ""))


def plan_phases(cfg: DemoConfig, n_pairs: int, stage1_s: float, seconds_left: float) -> DemoPlan:
    """As many of the asked-for retrains (at least one) as fit in ``seconds_left`` at the measured speed.

    A retrain starts once a quarter of its phase is curated and should serve before the phase ends;
    when it takes longer the demo trickles until it serves, which the expected time counts."""
    per_step = stage1_s * RETRAIN_PER_SEED_STEP / max(1, cfg.seed_steps)
    for retrains in range(max(1, cfg.retrains), 0, -1):
        phase_size = max(1, n_pairs // (retrains + 1))
        estimate = per_step * retrain_steps(cfg, phase_size, retrains)
        wait = max(MIN_RETRAIN_WAIT_S, RETRAIN_WAIT_FACTOR * estimate)
        phase_s = phase_size / cfg.rate
        expected = (retrains + 1) * phase_s + retrains * max(0.0, estimate - 0.75 * phase_s)
        if expected <= seconds_left - PLAN_MARGIN_S:
            break
    note = "" if retrains == cfg.retrains else (f"{cfg.retrains} asked for; {retrains} fit in the "
                                                f"{seconds_left:.0f} s left at this machine's speed")
    return DemoPlan(retrains, phase_size, cfg.threshold or max(20, int(phase_size * 0.25)), round(estimate, 1),
                    round(wait, 1), round(expected, 1), note)


# About this share of the curated pairs is gold (human-verified); the gold model retrains on new gold pairs.
GOLD_SHARE = 0.25
MIN_GOLD_THRESHOLD = 40


def gold_threshold(plan: DemoPlan) -> int:
    """New gold pairs that trigger a gold retrain: about once per phase."""
    return max(MIN_GOLD_THRESHOLD, int(plan.phase_size * CURATED_SHARE * GOLD_SHARE * 0.75))


def retrain_steps(cfg: DemoConfig, phase_size: int, retrains: int) -> int:
    """The steps of the longest retrain the plan expects: a full one over every phase's curated pairs when the
    demo's chain reaches one, else one over a phase's (plus the replay share)."""
    phases = retrains if cfg.full_retrain_every and retrains >= cfg.full_retrain_every else 1
    pairs = phase_size * CURATED_SHARE * (phases if phases > 1 else 1 / 0.7)
    return int(cfg.retrain_epochs * pairs / RETRAIN_BATCH) + 1


@dataclass
class DemoConfig:
    out_dir: Path = Path("demo-report")
    pairs: int = 1800
    hh_pairs: int = 120
    seed_pairs: int = 240
    holdout_pairs: int = 300
    # About a fifth of the labels wrong, as real noise is: random flips, style-biased flips, confident
    # but wrong answers preferred on objective tasks, and one source at 40% (streams.local.generate).
    flip_share: float = 0.06
    style_trap_share: float = 0.15
    style_flip_share: float = 0.05
    confident_flip_share: float = 0.04
    noisy_source_share: float = 0.15
    noisy_source_flip_rate: float = 0.4
    # Prove curation like for like (raw, curated and truth labels on the served chain's pairs, each seed) and
    # run one batch training on all curated pairs beside the loop (streams/local/curation.py).
    comparison: bool = True
    comparison_seeds: int = 2
    retrains: int = 2
    threshold: int = 0  # new curated pairs per retrain; 0 = derived from the phase size
    seed_steps: int = 15
    retrain_epochs: float = 2.0
    full_retrain_every: int = 2  # the second retrain trains from Stage 1 on every curated pair
    max_length: int = 128
    rate: float = 10.0
    max_in_flight: int = 16  # produced but not yet scored; the producer waits above it (backpressure)
    trickle_rate: float = 1.0
    annotators: int = 5
    annotator_accuracy: float = 0.9
    experts: int = 1
    workers: int = 1
    time_limit_s: float = 900.0
    seed: int = 0
    hh_file: Path | None = None
    # "generated": the generator's pairs (plus hh_pairs HH-RLHF pairs); "hh": HH-RLHF pairs alone with the same
    # kinds of noise planted, truth = the published label (streams.local.generate.plant_noise).
    stream: str = "generated"
    durable: bool = False  # the embedded broker on the object store (Settings.durable)
    brokers: int | None = None  # embedded brokers in one cluster (streams.embedded.stack.with_brokers); None: as configured


@dataclass
class DemoRun:
    """What the orchestration observed, for the report (the rest comes from the topics)."""

    cfg: DemoConfig
    settings: Settings
    started: float = field(default_factory=time.time)
    sent_at: dict[str, float] = field(default_factory=dict)
    phases: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # misbehaviour: the demo exits 1
    warnings: list[str] = field(default_factory=list)  # fewer retrains than planned and the like: exit 0
    plan: DemoPlan | None = None
    annotator_stats: dict[str, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _demo_settings(base: Settings, state: Path, run_id: str) -> Settings:
    # Its own topic prefix and model store: a demo never mixes with earlier runs or a user's data.
    return base.model_copy(update={"topic_prefix": f"{base.topic_prefix}demo-{run_id}.",
                                   "models_dir": state / "models", "shards_dir": state / "shards"})


def stream_config(cfg: DemoConfig) -> GenerateConfig:
    """The generator's settings for the demo's stream (before HH-RLHF pairs are mixed in)."""
    return GenerateConfig(n=cfg.pairs, seed=cfg.seed * 10 + 1, flip_share=cfg.flip_share,
                          style_trap_share=cfg.style_trap_share, style_flip_share=cfg.style_flip_share,
                          confident_flip_share=cfg.confident_flip_share, noisy_source_share=cfg.noisy_source_share,
                          noisy_source_flip_rate=cfg.noisy_source_flip_rate)


def hh_pairs(hh_file: Path, limit: int | None = None) -> list[dict]:
    """Valid HH-RLHF pairs from ``hh_file`` (its published label taken as the truth), in file order."""
    from schemas.exceptions import InvalidRecordError
    from schemas.formats import read_pair_lines
    from schemas.pairs import validate_pair

    out: list[dict] = []
    for line in read_pair_lines(hh_file, "hh-rlhf"):
        try:
            pair = validate_pair(line.obj) if isinstance(line.obj, dict) else None
        except InvalidRecordError:
            pair = None
        if pair is None:
            continue
        out.append(pair | {"metadata": pair["metadata"] | {"gen_category": "hh_rlhf"}})
        if limit is not None and len(out) >= limit:
            break
    return out


def hh_data(cfg: DemoConfig, hh_file: Path) -> dict[str, list[dict]]:
    """The demo's data from HH-RLHF alone (``--stream hh``): the stream with the demo's kinds of noise planted
    (truth = the published HH label), and clean seed, holdout (a share dressed as style traps) and confident-
    wrong probe from other HH pairs."""
    import random

    from streams.local.curation import CONFIDENT_PROBE_PAIRS
    from streams.local.generate import confident_wrong, plant_noise

    pairs = hh_pairs(hh_file)
    random.Random(cfg.seed).shuffle(pairs)
    held = cfg.seed_pairs + cfg.holdout_pairs + CONFIDENT_PROBE_PAIRS
    if len(pairs) < held + 10:
        raise DemoError(f"{hh_file} holds {len(pairs)} usable pairs, fewer than the {held} the seed set, holdout and "
                        "probe take; lower --seed-pairs or --holdout-pairs")
    seed_set, holdout, probe = (pairs[:cfg.seed_pairs], pairs[cfg.seed_pairs:cfg.seed_pairs + cfg.holdout_pairs],
                                pairs[cfg.seed_pairs + cfg.holdout_pairs:held])
    clean = GenerateConfig(seed=cfg.seed * 10 + 2, flip_share=0, style_trap_share=cfg.style_trap_share)
    return {"stream": list(plant_noise(pairs[held:held + cfg.pairs], stream_config(cfg))),
            "seed": list(plant_noise(seed_set, clean)),
            "holdout": list(plant_noise(holdout, GenerateConfig(seed=cfg.seed * 10 + 3, flip_share=0,
                                                                 style_trap_share=max(0.3, cfg.style_trap_share)))),
            "probe": confident_wrong(probe, cfg.seed * 10 + 4)}


def build_data(cfg: DemoConfig, state: Path) -> dict[str, list[dict]]:
    from streams.local.curation import CONFIDENT_PROBE_PAIRS, confident_probe

    hh_file = cfg.hh_file or (SHARED_HH if SHARED_HH.exists() else None)
    if cfg.stream == "hh":
        if hh_file is None:
            raise DemoError(f"--stream hh needs the HH-RLHF pairs: {SHARED_HH} is absent; give --hh-file")
        data = hh_data(cfg, hh_file)
        data["regression"] = data["seed"][:REGRESSION_PAIRS]
        for name, pairs in data.items():
            write_jsonl(pairs, state / f"{name}.jsonl")
        return data
    stream = list(generate(stream_config(cfg)))
    hh = hh_pairs(hh_file, cfg.hh_pairs) if cfg.hh_pairs and hh_file is not None else []
    # HH pairs are spread through the stream, as real traffic would be mixed.
    if hh:
        step = max(1, len(stream) // len(hh))
        for i, pair in enumerate(hh):
            stream.insert(min(len(stream), i * (step + 1)), pair)
    seed = [as_clean(p) for p in generate(GenerateConfig(n=cfg.seed_pairs, seed=cfg.seed * 10 + 2, flip_share=0,
                                                        style_trap_share=cfg.style_trap_share))]
    holdout = [as_clean(p) for p in generate(GenerateConfig(n=cfg.holdout_pairs, seed=cfg.seed * 10 + 3, flip_share=0,
                                                           style_trap_share=max(0.3, cfg.style_trap_share)))]
    regression = seed[:REGRESSION_PAIRS]  # the gate's fixed set: enough to be stable, small enough to be quick
    probe = confident_probe(CONFIDENT_PROBE_PAIRS, cfg.seed * 10 + 4)
    data = {"stream": stream, "seed": seed, "holdout": holdout, "regression": regression, "probe": probe}
    for name, pairs in data.items():
        write_jsonl(pairs, state / f"{name}.jsonl")
    return data


def _run_cli(args: list[str], settings: Settings, log_file: Path, timeout: float) -> None:
    import subprocess
    import sys

    with log_file.open("ab") as fh:
        proc = subprocess.run([sys.executable, "-m", "streams.cli", *args], env=child_env(settings), stdout=fh,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout)
    if proc.returncode != 0:
        tail = log_file.read_text(errors="replace")[-2500:]
        raise DemoError(f"`prefstream {' '.join(args)}` exited {proc.returncode}; its log ({log_file}) ends:\n{tail}")


def _published(settings: Settings) -> list[dict]:
    return [d for d in controller_decisions(settings) if d["role"] == "current" and d["decision"] == "published"]


def _serving_everywhere(dep: Deployment, version: str) -> bool:
    from streams.local.status import scrape

    for url in dep.worker_metrics:
        m = scrape(url)
        if m is None or not any(labels.get("current") == version for labels, _ in m.get("prefstream_model_info", [])):
            return False
    return True


class ScoredTail:
    """Follows prefs.scored in a thread: which pairs are scored, so the producer can hold back."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.seen: set[str] = set()
        self.held = 0  # records read but not yet decided committed or aborted (streams/kafka/committed.py)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="scored-tail", daemon=True)

    def _run(self) -> None:
        from streams.kafka.reader import TopicReader

        with TopicReader(self.settings.topic(topics.SCORED), "ScoredPair", self.settings) as reader:
            while not self.stop.is_set():
                for record in reader.decoded(idle_timeout=0.5):
                    self.seen.add(record.value["pair"]["pair_id"])
                    if self.stop.is_set():
                        return
                self.held = reader.filter.held()

    def __enter__(self) -> ScoredTail:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)  # its consumer must be closed before the stack goes down


def stream_pairs(run: DemoRun, dep: Deployment, pairs: list[dict], deadline: float, tail: ScoredTail) -> None:
    """Produce in retrains + 1 phases; between phases, trickle until the next version serves."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from streams.keys import generator_signer
    from streams.sdk import PreferenceProducer

    cfg, plan = run.cfg, run.plan
    if plan is None:
        raise DemoError("stream_pairs needs the run's plan: call plan_phases after Stage 1 first")
    retrains, phase_size = plan.retrains, plan.phase_size
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True)
    task = bar.add_task("streaming (phase 1)", total=len(pairs))
    # The generator signs with its key (generated under PREFSTREAM_HOME), so the workers honour the answers and
    # tests of its own source's pairs (the verified_by_tool route); the noisy source's vouches are ignored.
    with PreferenceProducer(run.settings, key=generator_signer(run.settings)) as producer, bar:
        phase = 0
        phase_start, waiting_since = time.time(), None
        for i, pair in enumerate(pairs):
            bar.update(task, completed=i)
            waiting = phase < retrains and i >= (phase + 1) * phase_size
            if waiting:
                waiting_since = waiting_since or time.time()
                published = _published(run.settings)
                # The newest version: a faster controller may have published several meanwhile, and the
                # workers then serve the last one, never the one this phase waited for.
                if len(published) > phase and _serving_everywhere(dep, published[-1]["version"]):
                    run.phases.append({"phase": phase + 1, "started": phase_start, "ended": time.time(),
                                       "version": published[-1]["version"], "first_index": phase * phase_size})
                    phase, phase_start, waiting, waiting_since = phase + 1, time.time(), False, None
                    if phase == retrains and dep.sup is not None:
                        # The demo has the retrains it asked for: stop the controller so the last phase
                        # measures the pipeline without a training job on the same cores.
                        ctl = next((c for c in dep.sup.children if c.name == "controller"), None)
                        if ctl is not None:
                            dep.sup.stop(ctl)
                            ctl.expected_exit = True
                    bar.update(task, description=f"streaming (phase {phase + 1}, serving {published[-1]['version']})")
                else:
                    waited = time.time() - waiting_since
                    bar.update(task, description=f"waiting for retrain {phase + 1} to serve: {waited:.0f} s of at most "
                                                 f"{plan.retrain_wait_s:.0f} s (trickling {cfg.trickle_rate:g}/s)")
                    if waiting and (waited > plan.retrain_wait_s or time.time() > deadline):
                        run.warnings.append(f"only {min(len(published), phase)} of {retrains} planned retrains were published and "
                                            f"served (retrain {phase + 1} did not serve within {waited:.0f} s); the "
                                            "rest of the stream went at full rate")
                        phase = retrains  # stream the rest at full rate and finish
                        waiting = False
            dep.check()
            # Backpressure, as a well-behaved load generator: latency then measures processing, not a
            # queue the producer built by outrunning the worker.
            while len(run.sent_at) - len(tail.seen) >= cfg.max_in_flight and time.time() < deadline:
                dep.check()
                time.sleep(0.05)
            producer.send(pair)
            run.sent_at[pair["pair_id"]] = time.time()
            time.sleep(1 / (cfg.trickle_rate if waiting else cfg.rate))
        producer.flush()
    run.phases.append({"phase": phase + 1, "started": phase_start, "ended": time.time(), "version": None,
                       "first_index": phase * phase_size})


def wait_drained(run: DemoRun, dep: Deployment, ids: set[str], deadline: float, tail: ScoredTail) -> None:
    """Until every pair is scored and the review queue is empty."""
    import redis

    from streams.review.queue import ReviewQueue

    while not ids <= tail.seen and time.time() < deadline:
        dep.check()
        time.sleep(0.5)
    if not ids <= tail.seen:
        run.failures.append(f"{len(ids - tail.seen)} pairs were not scored before the time limit (prefs.scored "
                            f"holds {tail.held} records of transactions no marker has decided yet)")
    # A retrain the last phase triggered is not waited for: stopping the controller cancels it (and
    # the decision log says so); the versions the demo asked for were served before the last phase.
    queue = ReviewQueue(redis.Redis.from_url(run.settings.redis_url), run.settings.topic_prefix)
    while time.time() < deadline:
        dep.check()
        stats = queue.stats()
        if not stats["pending"] and not stats["expert"]:
            break
        time.sleep(1)
    time.sleep(3)  # the shard writer's last flush (max age 1 s) and the aggregator's last batch


def _run_stages(run: DemoRun, dep: Deployment, data: dict[str, list[dict]], tokens: dict[str, str], names: list[str],
                experts: list[str], stop_annotators: threading.Event, t_end: float, stage: Any) -> None:
    """Stack, Stage 1, services, annotators, stream, drain; then the services stop (the stack stays for the report)."""
    from streams.review.simulate import load_truths, simulate

    cfg, settings = run.cfg, run.settings
    state = Path(settings.models_dir).parent
    sim: threading.Thread | None = None
    try:
        t0 = time.time()
        dep.start_stack()
        stage("stack up" + (" (embedded)" if dep.stack else f" (using {settings.bootstrap})"), t0)
        t0 = time.time()
        _run_cli(["retrain", "--seed-file", str(state / "seed.jsonl"), "--max-steps", str(cfg.seed_steps),
                  "--max-length", str(cfg.max_length), "--tolerance", "1", "--no-quantize"], settings,
                 state / "logs" / "seed.log", 900)
        stage("stage 1: first gold and current models from the seed set", t0)
        run.plan = plan_phases(cfg, len(data["stream"]), time.time() - t0, t_end - time.time())
        dep.controller_env["PREFSTREAM_CONTROLLER_THRESHOLD_CURRENT"] = str(run.plan.threshold)
        # The gold model learns from the human-verified pairs too: it decides with the current model which labels
        # are flipped (both below flip_below) and which are silver (gold agrees), so a gold model frozen at
        # Stage 1 would keep sending to people the pairs the retrained current model is already sure of.
        dep.controller_env["PREFSTREAM_CONTROLLER_THRESHOLD_GOLD"] = str(gold_threshold(run.plan))
        console.print(run.plan.describe(cfg.rate), highlight=False)
        t0 = time.time()
        dep.start_services()
        stage(f"{cfg.workers} worker(s), review app ({dep.review_url}) and controller up", t0)
        truths = load_truths(state / "stream.jsonl")
        sim = threading.Thread(target=lambda: run.annotator_stats.update(asdict(simulate(
            dep.review_url, [tokens[n] for n in names], cfg.annotator_accuracy, truths, idle_s=10**9,
            seed=cfg.seed, expert_tokens=[tokens[n] for n in experts], stop=stop_annotators))), daemon=True)
        sim.start()
        with ScoredTail(settings) as tail:
            t0 = time.time()
            stream_pairs(run, dep, data["stream"], t_end, tail)
            stage(f"streamed {len(data['stream'])} pairs in {len(run.phases)} phases", t0)
            t0 = time.time()
            wait_drained(run, dep, {p["pair_id"] for p in data["stream"]}, t_end + 120, tail)
            stage("every pair scored, review queue drained", t0)
    except KeyboardInterrupt:
        run.failures.append("interrupted")
    except StreamsError as exc:
        run.failures.append(str(exc))
    finally:
        stop_annotators.set()
        if sim is not None:
            sim.join(40)  # their statistics go into the report
        t0 = time.time()
        codes = dep.stop_services()
        if dep.left_running():
            run.failures.append(f"still running after stop: {dep.left_running()}")
        stage("services stopped (" + ", ".join(f"{k} {describe_exit(v)}" for k, v in codes.items()) + ")", t0)


def run_demo(cfg: DemoConfig, base: Settings) -> dict[str, Any]:
    from streams.local.report_files import write_report

    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
    root = Path(base.home) / "demo"
    shutil.rmtree(root, ignore_errors=True)  # the previous run's state; its report stays in out_dir
    state = root / run_id
    state.mkdir(parents=True)
    settings = _demo_settings(with_brokers(base, cfg.durable, cfg.brokers), state, run_id)
    run = DemoRun(cfg, settings)
    t_end = run.started + cfg.time_limit_s

    def stage(name: str, t0: float) -> None:
        run.stage_seconds[name] = round(time.time() - t0, 1)
        console.print(f"[green]✓[/] {name} ({run.stage_seconds[name]:.0f} s)")

    t0 = time.time()
    data = build_data(cfg, state)
    stage(f"generated {len(data['stream'])} pairs to stream, {len(data['seed'])} seed, {len(data['holdout'])} holdout", t0)
    names = [f"annotator{i}" for i in range(cfg.annotators)]
    experts = [f"expert{i}" for i in range(cfg.experts)]
    tokens = {n: secrets.token_urlsafe(12) for n in names + experts}
    dep = Deployment(
        settings, state / "logs", workers=cfg.workers, review_port=free_port(),
        review_tokens=",".join(f"{n}:{t}" for n, t in tokens.items()), review_experts=",".join(experts),
        # On a small machine the worker and a retrain job share the cores: one thread for the worker keeps
        # them from thrashing (measured: a retrain took > 4 min beside a worker on all cores).
        # Content de-duplication off: the generator draws from small template pools with replacement (240
        # generated pairs hold 40 repeats, some published flipped), and the demo measures how the loop handles
        # every pair it streamed; the stream's repeats would otherwise be dead-lettered before scoring.
        worker_env={"PREFSTREAM_WORKER_SHARD_MAX_AGE_S": "1", "PREFSTREAM_WORKER_THREADS": "1",
                    "PREFSTREAM_WORKER_DUPLICATE_RETENTION_S": "0"},
        # ... and one thread for the retrain jobs (inherited from the controller), so that the two never
        # ask for more cores than there are.
        # The retrain threshold is set from the plan once Stage 1 has measured the machine's speed.
        controller_env={"OMP_NUM_THREADS": "1",
                        "PREFSTREAM_CONTROLLER_POLL_S": "2",
                        "PREFSTREAM_CONTROLLER_RETRAIN_ARGS": (
                            f"--epochs {cfg.retrain_epochs:g} --full-retrain-every {cfg.full_retrain_every} "
                            f"--max-length {cfg.max_length} --tolerance 0.01 "
                            f"--min-pairs 20 --freeze-layers {RETRAIN_FREEZE_LAYERS} --no-quantize --regression-file {state / 'regression.jsonl'}")})
    stop_annotators = threading.Event()
    (state / "logs").mkdir(parents=True, exist_ok=True)
    try:
        _run_stages(run, dep, data, tokens, names, experts, stop_annotators, t_end, stage)
        if "interrupted" in run.failures:
            raise KeyboardInterrupt  # no report for a run the user stopped; the finally still cleans up
        published = _published(settings)
        if run.plan and len(published) < run.plan.retrains and not run.warnings:
            run.warnings.append(f"{len(published)} of {run.plan.retrains} planned retrains were published")
        t0 = time.time()
        report = write_report(run, data, controller_decisions(settings))  # reads the topics: the stack is still up
        stage(f"report written to {cfg.out_dir}", t0)
    finally:
        dep.stop()  # services first (idempotent), then the stack if the demo started it
    return report


def demo_main(cfg: DemoConfig) -> None:
    """Run the demo, print its summary and exit 1 if a stage failed (`prefstream demo`)."""
    logging.basicConfig(level=logging.WARNING)
    try:
        report = run_demo(cfg, get_settings())
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: every process the demo started was stopped; no report written")
        raise SystemExit(130) from None
    from streams.local.report_files import summary

    console.print(summary(report))
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")
    if report["failures"]:
        for f in report["failures"]:
            console.print(f"[bold red]failed:[/] {f}")
        raise SystemExit(1)
