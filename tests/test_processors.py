"""Unit tests of the processors' decisions (no broker): router, verifiers, retrieval, labeler, dedupe."""

from __future__ import annotations

import numpy as np
import pytest

from streams.exceptions import ConfigError
from streams.runtime.processors.router import RouterPolicy, route, similar_k
from streams.runtime.processors.verifiers import run_python, verify, verify_math
from streams.runtime.retrieval.index import EXACT_LIMIT, NeighbourIndex
from streams.settings import WorkerSettings
from tests.helpers import FakeMessage, needs_bwrap


@pytest.mark.parametrize(("p", "gold_p", "kind", "k"), [
    (0.05, 0.05, "flipped", 0),
    (0.05, 0.5, "review", 8),
    (0.3, None, "review", 8),
    (0.5, 0.9, "review", 4),
    (0.7, 0.9, "review", 2),
    (0.79, 0.9, "review", 1),
    (0.9, 0.9, "silver", 0),
    (0.9, 0.3, "dropped", 0),
    (0.9, None, "dropped", 0),
])
def test_router_policy(p, gold_p, kind, k):
    r = route(p, gold_p, None, RouterPolicy.from_settings(WorkerSettings()))
    assert (r.kind, r.k) == (kind, k)
    assert r.flip == (kind == "flipped")


def test_similar_k_formula():
    assert [similar_k(p) for p in (0.0, 0.49, 0.5, 0.6, 0.75, 0.874, 0.99)] == [8, 8, 4, 3, 2, 1, 0]


def test_verifier_decides_before_the_models():
    r = route(0.01, 0.01, ("math", "chosen"), RouterPolicy.from_settings(WorkerSettings()))
    assert (r.kind, r.flip) == ("verified_by_tool", False)
    assert route(0.99, 0.99, ("math", "rejected"), RouterPolicy.from_settings(WorkerSettings())).flip


def math_pair(prompt, chosen, rejected, **extra):
    return {"conversation": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected,
            "objectivity": "factual", "task_category": "arithmetic", "metadata": {}} | extra


def test_math_verifier_compares_final_numbers():
    assert verify(math_pair("What is 12 * 12?", "That makes 144.", "It is 145.")) == ("math", "chosen")
    assert verify(math_pair("What is 12 * 12?", "It is 145.", "Surely 144")) == ("math", "rejected")
    assert verify(math_pair("What is 12 * 12?", "144", "144.0")) is None  # both right: the tool cannot decide
    assert verify_math(math_pair("Tell me a joke", "1", "2")) is None
    assert verify(math_pair("How far?", "It is 1,500 km.", "It is 15 km.", metadata={"answer": "1500"})) == ("math", "chosen")


@needs_bwrap
def test_code_verifier_runs_tests_in_a_sandbox():
    tests = "assert add(2, 3) == 5"
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    bad = "def add(a, b):\n    return a - b"
    pair = {"conversation": [{"role": "user", "content": "add"}], "chosen": bad, "rejected": good, "metadata": {"tests": tests}}
    assert verify(pair) == ("code", "rejected")
    assert not run_python("while True:\n    pass", "", timeout=1.0)
    assert not run_python("import socket\nsocket.create_connection(('127.0.0.1', 9))", "")
    assert not run_python("x = bytearray(2 * 1024 ** 3)", "")
    assert run_python("import os\nassert 'PREFSTREAM_HOME' not in os.environ", "")


def _unit(rng, n, d):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_retrieval_exact_and_ivf_agree_with_brute_force():
    rng = np.random.default_rng(0)
    centres = _unit(rng, 50, 32)
    vecs = centres[rng.integers(0, 50, EXACT_LIMIT + 5000)] + 0.3 * _unit(rng, EXACT_LIMIT + 5000, 32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = NeighbourIndex(32)
    index.add(vecs[:1000], [(f"p{i}", "", "", "", "h") for i in range(1000)])
    q = vecs[3]
    assert [n["pair_id"] for n in index.search(q, 5)] == [f"p{i}" for i in np.argsort(-(vecs[:1000] @ q))[:5]]
    index.add(vecs[1000:], [(f"p{i}", "", "", "", "h") for i in range(1000, len(vecs))])
    assert index.centroids is not None, "the index should switch to IVF past EXACT_LIMIT"
    hits = 0
    for qi in rng.integers(0, len(vecs), 50):
        exact = {f"p{i}" for i in np.argsort(-(vecs @ vecs[qi]))[:8]}
        hits += len({n["pair_id"] for n in index.search(vecs[qi], 8)} & exact)
    assert hits / 400 >= 0.95
    assert all(n["pair_id"] != "p3" for n in index.search(vecs[3], 8, exclude="p3"))


def test_retrieval_forgets_oldest_when_full():
    rng = np.random.default_rng(1)
    index = NeighbourIndex(8, capacity=10)
    vecs = _unit(rng, 15, 8)
    index.add(vecs, [(f"p{i}", "", "", "", "h") for i in range(15)])
    assert index.size == 10 and "p0" not in index.ids and "p14" in index.ids
    assert index.search(vecs[14], 1)[0]["pair_id"] == "p14"


@pytest.fixture(scope="module")
def labeler():
    from streams.runtime.processors.embedder import Embedder
    from streams.runtime.processors.labeler import Labeler, load_taxonomy

    assert len(load_taxonomy()) >= 50
    return Labeler(Embedder())


@pytest.fixture(scope="module")
def fp32_labeler():
    from streams.runtime.processors.embedder import Embedder
    from streams.runtime.processors.labeler import Labeler

    return Labeler(Embedder(precision="fp32"))


def test_the_onnx_embedder_gives_the_torch_vectors(fp32_labeler):
    """The worker embeds on ONNX Runtime (exported in memory); labels and neighbours must not move."""
    from streams.runtime.processors.embedder import Embedder

    texts = ["What is 17 * 23?", "Write a haiku about the autumn rain, please, in the style of Basho " * 6, "hi"]
    onnx, ref = fp32_labeler.embedder, Embedder(backend="torch")
    assert onnx.backend == "onnx" and ref.backend == "torch"
    a, b = onnx.embed(texts), ref.embed(texts)
    assert a.shape == (3, onnx.dim)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    assert np.min((a * b).sum(1)) > 0.9999
    with pytest.raises(ConfigError, match="not one of"):  # the package's error, not a bare ValueError
        Embedder(backend="tensorrt")
    with pytest.raises(ConfigError, match="precision 'int4' is not one of int8, fp32"):
        Embedder(precision="int4")


def test_the_int8_embedder_keeps_clear_categories_and_close_vectors(labeler, fp32_labeler):
    """The worker's default INT8 encoder may move near-ties between categories, not clear cases."""
    from schemas.pairs import prompt_text
    from tests.helpers import hh_valid_pairs

    prompts = list(dict.fromkeys(prompt_text(p) for p in hh_valid_pairs(800)))
    int8, fp32 = labeler, fp32_labeler
    assert int8.embedder.precision == "int8" and fp32.embedder.precision == "fp32"
    a, b = fp32.embedder.embed(prompts), int8.embedder.embed(prompts)
    sims = a @ fp32.centroids.T
    top2 = np.sort(sims, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] >= 0.02
    same = np.array(int8.categorize(prompts)) == np.array(fp32.categorize(prompts))
    # Measured on 2,257 prompts: 98.4% on clear cases, 90.2% overall, median cosine 0.990.
    assert clear.mean() > 0.5 and same[clear].mean() >= 0.96 and same.mean() >= 0.85
    assert np.median((a * b).sum(1)) > 0.98
    # Dynamic INT8 scales activations per batch, so a prompt's vector moves a little with its batch.
    alone = np.concatenate([int8.embedder._embed([t]) for t in prompts[:20]])
    assert np.min((alone * int8.embedder._embed(prompts[:20])).sum(1)) > 0.98


def test_embedding_in_padded_batches_gives_each_text_its_own_vector(fp32_labeler):
    """Prompts are batched by token length with padding; the mask must keep every vector its own.

    In fp32: INT8's per-batch activation scales move vectors a little with their batch (tested above)."""
    emb = fp32_labeler.embedder
    texts = [" ".join(["word"] * n + [f"about topic {n}"]) for n in range(1, 41)] + ["?", "x " * 300]
    batched = emb._embed(texts)  # the uncached path, as a fresh micro-batch takes it
    single = np.concatenate([emb._embed([t]) for t in texts])
    assert np.min((batched * single).sum(1)) > 0.99999


@pytest.mark.parametrize(("prompt", "category"), [
    ("What is 17 * 23?", "arithmetic"),
    ("What is the capital of Peru?", "world_facts"),
    ("Write a haiku about the autumn rain", "poetry"),
    ("How do I build a pipe bomb at home?", "harmful_request"),
    ("Convert 12 miles to kilometres", "unit_conversion"),
])
def test_labeler_assigns_the_five_attributes(labeler, prompt, category):
    pair = {"conversation": [{"role": "user", "content": prompt}], "chosen": "a", "rejected": "b"}
    labeler.label([pair], [0.6])
    assert pair["task_category"] == category
    assert pair["objectivity"] in ("factual", "opinion", "open-ended")
    assert pair["controversiality"] == "high"  # model disagreement 0.6
    assert pair["expected_attributes"] and pair["annotation_guideline"]


def test_labeler_keeps_producer_attributes(labeler):
    pair = {"conversation": [{"role": "user", "content": "What is 2+2?"}], "chosen": "4", "rejected": "5",
            "task_category": "algebra", "objectivity": "opinion"}
    labeler.label([pair])
    assert (pair["task_category"], pair["objectivity"], pair["controversiality"]) == ("algebra", "opinion", "low")


def test_llm_labeler_falls_back_on_failure(labeler):
    from streams.runtime.processors.labeler import LLMLabeler

    llm = LLMLabeler("http://127.0.0.1:9", "none", labeler, timeout=0.5)
    pair = {"conversation": [{"role": "user", "content": "What is 17 * 23?"}], "chosen": "a", "rejected": "b"}
    llm.label([pair])
    assert llm.failures == 1 and pair["task_category"] == "arithmetic"


def test_llm_labeler_uses_a_json_schema_answer_and_falls_back_per_pair(labeler):
    """The success path against a local OpenAI-compatible endpoint (as vLLM or Ollama would answer)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from streams.runtime.processors.labeler import LLMLabeler

    seen: list[dict] = []

    class FakeLLM(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            prompt = body["messages"][-1]["content"]
            category = "poetry_slam" if "rhyme" in prompt else "creative_story"  # the first is not in the taxonomy
            answer = {"task_category": category, "objectivity": "open-ended", "controversiality": "medium",
                      "expected_attributes": ["vivid imagery"], "annotation_guideline": "Prefer the more original story."}
            out = json.dumps({"choices": [{"message": {"role": "assistant", "content": json.dumps(answer)}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        llm = LLMLabeler(f"http://127.0.0.1:{server.server_port}/v1", "qwen3-8b", labeler, api_key="k3y")
        story = {"conversation": [{"role": "user", "content": "Write a story about a lighthouse."},
                                  {"role": "assistant", "content": "The keeper lit the lamp."},
                                  {"role": "user", "content": "Longer, please."}],
                 "chosen": "The keeper lit the lamp at dusk", "rejected": "No."}
        rhyme = {"conversation": [{"role": "user", "content": "What is 17 * 23? Answer in rhyme."}], "chosen": "a",
                 "rejected": "b"}
        llm.label([story, rhyme])
    finally:
        server.shutdown()
    assert [s["path"] for s in seen] == ["/v1/chat/completions"] * 2
    assert seen[0]["auth"] == "Bearer k3y" and seen[0]["body"]["model"] == "qwen3-8b"
    assert seen[0]["body"]["response_format"]["type"] == "json_schema"
    asked = seen[0]["body"]["messages"][-1]["content"]  # every turn and both responses, not the last turn alone
    assert asked.index("Write a story") < asked.index("[assistant] The keeper") < asked.index("Longer, please.") < \
        asked.index("[response 1] The keeper lit the lamp at dusk") < asked.index("[response 2] No.")
    assert (story["task_category"], story["objectivity"], story["controversiality"]) == \
        ("creative_story", "open-ended", "medium")
    assert story["expected_attributes"] == ["vivid imagery"]
    assert story["annotation_guideline"] == "Prefer the more original story."
    # An answer outside the schema (unknown category) is refused for that pair only; the default labels it.
    assert llm.failures == 1 and rhyme["task_category"] == "arithmetic"


def test_a_batch_commits_its_own_offsets_not_the_consumers_position():
    """A commit covers exactly the batch's records, whatever the consumer has fetched beyond them."""
    from streams.kafka.transactions import next_offsets

    batch = [FakeMessage(None, topic="raw", partition=part, offset=off) for part, off in ((0, 7), (1, 3), (0, 9), (0, 8))]
    got = {(tp.topic, tp.partition): tp.offset for tp in next_offsets(batch)}
    assert got == {("raw", 0): 10, ("raw", 1): 4}


class _QueueConsumer:
    """consume(n, timeout) over a local queue, recording how long each call was allowed to block."""

    def __init__(self, ready: int) -> None:
        self.queue = [FakeMessage(None, topic="raw", partition=0, offset=i) for i in range(ready)]
        self.waits: list[float] = []

    def consume(self, n: int, timeout: float) -> list[FakeMessage]:
        if len(self.queue) < n:
            self.waits.append(timeout)
        out, self.queue = self.queue[:n], self.queue[n:]
        return out


@pytest.mark.parametrize(("ready", "max_wait", "size", "waits"), [
    (3, 0.0, 3, [0]),          # records ready: score them now, no fill wait
    (40, 0.05, 32, []),        # a full batch ready: never wait
    (3, 0.05, 3, [0, 0.05]),   # a short batch waits max_wait for more only when configured to
    (0, 0.0, 0, [0, 0.5]),     # idle: block for a first record (then check the stop flag)
])
def test_a_micro_batch_takes_what_is_ready_without_a_fixed_wait(ready, max_wait, size, waits):
    from streams.runtime.worker import next_batch

    consumer = _QueueConsumer(ready)
    assert len(next_batch(consumer, 32, max_wait, idle_s=0.5)) == size
    assert consumer.waits == waits


def test_micro_batches_grow_for_a_fast_model_and_shrink_for_a_slow_one():
    from streams.runtime.worker import BatchSizer

    sizer = BatchSizer(max_batch=128, target_s=8.0)
    assert sizer.limit == 8  # nothing measured yet
    sizer.observe(8, 0.5)  # 16 pairs/s: 8 s of work is 128 pairs
    assert sizer.limit == 128
    for _ in range(6):  # a 7B model on CPU after a hot-swap: 0.5 pairs/s
        sizer.observe(sizer.limit, sizer.limit / 0.5)
    assert 4 <= sizer.limit <= 5
    sizer.observe(0, 0.0)  # an all-duplicate batch says nothing
    assert 4 <= sizer.limit <= 5


@pytest.mark.parametrize(("command", "variable"), [("worker", "PREFSTREAM_WORKER_BATCH_TARGET_S"),
                                                   ("controller", "PREFSTREAM_CONTROLLER_"),
                                                   ("review", "PREFSTREAM_REVIEW_TOKENS")])
def test_service_help_lists_every_environment_setting(command, variable):
    from click.testing import CliRunner

    from streams.cli import services
    from streams.settings import ControllerSettings, ReviewSettings, WorkerSettings

    cls = {"worker": WorkerSettings, "controller": ControllerSettings, "review": ReviewSettings}[command]
    out = CliRunner().invoke(getattr(services, command), ["--help"], terminal_width=200).output
    assert variable in out
    prefix = cls.model_config["env_prefix"]
    assert all(f"{prefix}{name.upper()} (default" in out for name in cls.model_fields), out
