"""`prefstream controller`: decides when to retrain, runs the job, watches the result live.

- Triggers per role: new pairs in the shard manifest past a threshold, an interval with new data,
  or drift (the current model's misprediction rate rising above its own baseline).
- Never two retrains of the same role at once.
- Live rollback: after a swap, if the new current version disagrees with the gold model on more
  gold-checked pairs than its predecessor did (by more than ``rollback_bound``), it is rolled back.
- tau per task category follows the audited precision of silver pairs (tau.py).
- Every decision (trigger or not, outcome, rollback, tau move) goes to the log, to metrics and to
  ``<models_dir>/controller-decisions.jsonl``.
"""

from __future__ import annotations

import json
import logging
import shlex
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from prometheus_client import Counter, Gauge

from streams.kafka import topics
from streams.kafka.reader import SeenSet, TopicReader, identity
from streams.review.tau import TauRule, TauTuner
from streams.runtime.jobs import Handle, JobOutcome, JobRunner, LocalRunner
from streams.settings import ControllerSettings, Settings
from trainers.storage.files import atomic_write
from trainers.storage.registry import BOOTSTRAP_VERSION, ModelStore
from trainers.storage.shards import ShardStore
from trainers.training.selection import CURRENT_SPLITS, GOLD_SPLITS

log = logging.getLogger(__name__)
DECISIONS = Counter("prefstream_controller_decisions_total", "Controller decisions", ["role", "decision", "reason"])
RUNNING = Gauge("prefstream_controller_retrain_running", "1 while a retrain of the role runs", ["role"])
SPLITS = {"current": CURRENT_SPLITS, "gold": GOLD_SPLITS}


@dataclass
class VersionStats:
    mispredicted: deque = field(default_factory=lambda: deque(maxlen=2000))
    disagree: deque = field(default_factory=lambda: deque(maxlen=2000))
    first_seen: float = field(default_factory=time.time)


class ScoredMonitor:
    """Follows prefs.scored (records written since it started) and keeps per-version rates for drift
    and rollback.

    Only scores of committed worker transactions count: its ``TopicReader`` drops those of a batch
    the worker aborted (which the embedded broker delivers), so a version that scored a batch that
    was then redone by another is not judged by it (streams/kafka/committed.py). Each ScoredPair
    identity (pair_id, model_version) counts once, so a pair sent again does not weigh twice in the
    windows. The last ``SEEN_MAX`` identities are remembered, far more than the windows hold.
    """

    SEEN_MAX = 100_000

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats: dict[str, VersionStats] = defaultdict(VersionStats)
        self.order: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.seen = SeenSet(self.SEEN_MAX)
        self.duplicates = 0

    def observe(self, rec: dict) -> None:
        v = rec["model_version"]
        key = identity("ScoredPair", rec)
        with self.lock:
            if not self.seen.add(key):
                self.duplicates += 1
                return
            if v not in self.stats:
                self.order.append(v)
            st = self.stats[v]
            st.mispredicted.append(rec["p"] < 0.5)
            if rec.get("gold_p") is not None:
                st.disagree.append((rec["p"] >= 0.5) != (rec["gold_p"] >= 0.5))

    def run(self) -> None:
        # from_beginning=False also skips records older than the reader: the embedded broker's "end"
        # offset is the start of the last stored batch, not the end (streams.kafka.reader).
        with TopicReader(self.settings.topic(topics.SCORED), "ScoredPair", self.settings, from_beginning=False) as reader:
            for record in reader.decoded(idle_timeout=None):  # an undecodable record is counted and skipped
                if self.stop.is_set():
                    return
                try:
                    self.observe(record.value)
                except Exception as exc:  # one odd record must not blind the controller
                    log.warning("unusable ScoredPair at %d@%d: %s", record.partition, record.offset, exc)


def _rate(values: deque, last: int) -> float:
    """The mean of the last ``last`` values; the callers check there are that many."""
    vals = list(values)[-last:]
    return sum(vals) / len(vals)


class Controller:
    def __init__(self, settings: Settings, csettings: ControllerSettings, runner: JobRunner | None = None,
                 announce: Any = None) -> None:
        self.settings, self.csettings = settings, csettings
        self.store: ModelStore = settings.model_store()
        self.shards: ShardStore = settings.shard_store()
        self.state_file = settings.controller_state_file
        self.decisions_file = settings.controller_decisions_file
        self.runner = runner or self._make_runner()
        self.announce = announce
        self.running: dict[str, Handle] = {}
        self.running_pairs: dict[str, int] = {}  # the curated pairs available when the running job started
        self.monitor = ScoredMonitor(settings)
        self.stop = threading.Event()
        self.state = self._load_state()
        self.last_reason: dict[str, str] = {}
        self.rolled_back: set[str] = set()
        self.tau = TauTuner(redis.Redis.from_url(settings.redis_url, socket_timeout=5), settings.topic_prefix,
                            TauRule.from_settings(csettings))

    def _make_runner(self) -> JobRunner:
        if self.csettings.runner == "kubernetes":
            from streams.runtime.jobs import JobTemplate, KubernetesRunner

            return KubernetesRunner(JobTemplate.from_settings(self.settings, self.csettings))
        return LocalRunner(Path(self.settings.home) / "logs" / "retrain", gpus=self.csettings.job_gpus)

    # ------------------------------------------------------------------ state and records
    def _load_state(self) -> dict[str, Any]:
        if self.state_file.exists():
            return json.loads(self.state_file.read_text())
        return {"trained_total": {"current": 0, "gold": 0}, "last_run": {"current": time.time(), "gold": time.time()}}

    def _save_state(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.state_file, json.dumps(self.state).encode())

    def record(self, role: str, decision: str, reason: str, **extra: Any) -> None:
        DECISIONS.labels(role, decision, reason.split(":")[0][:40]).inc()
        entry = {"time": time.time(), "role": role, "decision": decision, "reason": reason} | extra
        self.decisions_file.parent.mkdir(parents=True, exist_ok=True)
        with self.decisions_file.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        log.info("%s: %s (%s)", role, decision, reason)

    # ------------------------------------------------------------------ decisions
    def totals(self) -> dict[str, int]:
        return self.shards.manifest().totals()  # the manifests alone: no file is read or downloaded to count

    def why_retrain(self, role: str, totals: dict[str, int]) -> tuple[str | None, str]:
        available = sum(totals.get(s, 0) for s in SPLITS[role])
        new = available - self.state["trained_total"][role]
        threshold = self.csettings.threshold_current if role == "current" else self.csettings.threshold_gold
        if new >= threshold:
            return "threshold", f"{new} new pairs >= threshold {threshold}"
        if self.csettings.interval_s and new > 0 and time.time() - self.state["last_run"][role] >= self.csettings.interval_s:
            return "interval", f"{self.csettings.interval_s:.0f} s passed with {new} new pairs"
        if role == "current" and new > 0 and (drift := self.drift()) is not None:
            return "drift", drift
        return None, f"{new} new pairs < threshold {threshold}"

    def drift(self) -> str | None:
        serving = self.store.serving("current") or BOOTSTRAP_VERSION
        with self.monitor.lock:
            st = self.monitor.stats.get(serving)
            if st is None or len(st.mispredicted) < 2 * self.csettings.window:
                return None
            base = sum(list(st.mispredicted)[: self.csettings.window]) / self.csettings.window
            now = _rate(st.mispredicted, self.csettings.window)
        if now - base > self.csettings.drift_bound:
            return f"misprediction rate {now:.3f} rose above its baseline {base:.3f} by more than {self.csettings.drift_bound}"
        return None

    def check_rollback(self) -> None:
        """Live rollback of the current role when the new version disagrees with gold more than the old one."""
        hist = self.store.history("current")
        if len(hist) < 2 or hist[-1] in self.rolled_back:
            return
        new, old = hist[-1], hist[-2]
        with self.monitor.lock:
            sn, so = self.monitor.stats.get(new), self.monitor.stats.get(old)
            if sn is None or so is None or len(sn.disagree) < self.csettings.window or len(so.disagree) < self.csettings.window:
                return
            rn, ro = _rate(sn.disagree, self.csettings.window), _rate(so.disagree, self.csettings.window)
        if rn - ro > self.csettings.rollback_bound:
            reason = (f"live rollback: {new} disagrees with the gold model on {rn:.3f} of gold-checked pairs vs "
                      f"{ro:.3f} for {old}")
            self.rolled_back.add(new)
            self.store.rollback("current", announce=self.announce, reason=reason)
            self.record("current", "rolled_back", reason, version=new, restored=old)

    def _finish(self, role: str, outcome: JobOutcome, available: int) -> None:
        RUNNING.labels(role).set(0)
        result = outcome.result or {}
        if outcome.succeeded and result.get("decision") == "published":
            self.record(role, "published", result.get("reason", ""), version=result.get("version"))
        elif outcome.succeeded and result.get("decision") == "gate_failed":
            self.record(role, "gate_failed", result.get("reason", ""))
        elif outcome.succeeded and result.get("decision") == "skipped":
            self.record(role, "skipped", result.get("reason", ""))
            return  # not enough data: keep the counter so the pairs count towards the next trigger
        else:
            self.record(role, "job_failed", outcome.detail)
            return
        self.state["trained_total"][role] = available
        self.state["last_run"][role] = time.time()
        self._save_state()

    def step(self) -> None:
        totals = self.totals()
        for role in ("gold", "current"):
            available = sum(totals.get(s, 0) for s in SPLITS[role])
            handle = self.running.get(role)
            if handle is not None:
                if handle.done():
                    del self.running[role]
                    self._finish(role, handle.outcome(), self.running_pairs.pop(role))
                continue
            kind, why = self.why_retrain(role, totals)
            if kind is None:
                if self.last_reason.get(role) != why:
                    DECISIONS.labels(role, "waiting", "below_threshold").inc()
                    log.debug("%s: not retraining (%s)", role, why)
                self.last_reason[role] = why
                continue
            labels = {"prefstream.io/data-pairs": str(available), "prefstream.io/trigger": kind}
            handle = self.runner.submit(role, labels, shlex.split(self.csettings.retrain_args))
            self.running[role], self.running_pairs[role] = handle, available
            RUNNING.labels(role).set(1)
            self.record(role, "triggered", f"{kind}: {why}", job=handle.name)
        self.check_rollback()
        self.tune_tau()

    def tune_tau(self) -> None:
        """Move tau per category by the audits (streams/review/tau.py); Redis away only skips a step."""
        try:
            moves = self.tau.step()
        except redis.RedisError as exc:
            log.warning("could not read the audit counts from Redis (%s); tau stays until the next step", exc)
            return
        for move in moves:
            self.record("router", "tau_moved", move["reason"], category=move["category"],
                        shift_from=move["shift_from"], shift_to=move["shift_to"])

    def run(self) -> None:
        threading.Thread(target=self.monitor.run, name="scored-monitor", daemon=True).start()
        while not self.stop.is_set():
            try:
                self.step()
            except Exception:  # keep deciding; the error is logged with its traceback
                log.exception("controller step failed")
            self.stop.wait(self.csettings.poll_s)
        self.monitor.stop.set()
        for role, handle in self.running.items():
            if hasattr(handle, "cancel"):  # local jobs die with the controller; cluster Jobs run on
                handle.cancel()
                self.record(role, "cancelled", "the controller stopped while the job ran", job=handle.name)
