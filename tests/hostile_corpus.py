"""A generated corpus of hostile prefs.raw records for the fault suite (tests/test_fault_suite.py).

Every record is unique (its index is in its bytes), so a dead letter maps back to the one record it
came from by ``original_sha256``. Each record says what the worker must do with it:

- ``dlq``: dead-lettered with one of ``reasons``;
- ``scored``: a legitimate pair with a hostile prompt (5,000-term sums, exponent towers): scored once,
  never dead-lettered (the math verifier gives up on it quickly; tests/test_hostile_input.py);
- ``dedup``: a second record with the id of a good pair, an exact copy: dropped as a duplicate, so
  the good pair is scored once;
- ``conflict``: a second record with the id of a good pair and other text: dead-lettered as
  ``duplicate_id_conflict`` (never silently dropped), and the good pair is scored once, with its own
  text. Both kinds are sent after their originals.

``kcat``: whether the record can be published with kcat (it has a value and no per-record key).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass

BIG_NUMBER = "9" * 5000
FIVE_MB = 5 * 1000 * 1000


@dataclass(frozen=True)
class Hostile:
    cls: str
    value: bytes | None
    expect: str = "dlq"  # dlq | scored | dedup | conflict
    reasons: frozenset[str] = frozenset()
    headers: tuple[tuple[str, bytes], ...] = ()
    key: bytes | None = None
    pair_id: str | None = None  # scored / dedup / conflict: the id that must end scored exactly once
    kcat: bool = True

    @property
    def sha256(self) -> str | None:
        return hashlib.sha256(self.value).hexdigest() if self.value is not None else None


def good_pairs(n: int, tag: str, seed: int = 0) -> list[dict]:
    """Short, valid pairs with unique ids; the chosen answer is the better one (the annotators' truth)."""
    rng = random.Random(seed)
    return [{"pair_id": f"{tag}-g{i}", "prompt": f"Say something kind about item {i} of batch {tag}.",
             "chosen": f"Item {i} is lovely and very useful.",
             "rejected": rng.choice(["Meh.", "Bad item.", "No.", "Whatever."])} for i in range(n)]


def _dlq(reason: str | set[str]) -> dict:
    return {"expect": "dlq", "reasons": frozenset({reason} if isinstance(reason, str) else reason)}


def _json(obj: dict) -> bytes:
    return json.dumps(obj).encode()


def _created(i: int, raw: str) -> bytes:
    return (b'{"prompt":"hostile %d","chosen":"a","rejected":"b","created_at":%s}' % (i, raw.encode()))


def _fingerprint(name: str) -> bytes:
    from schemas import registry

    return registry.get(name).fingerprint.encode()


def _avro_pair(i: int, chosen: str) -> tuple[bytes, tuple[tuple[str, bytes], ...]]:
    from schemas.pairs import validate_pair
    from schemas.wire import ValueCodec

    pair = validate_pair({"pair_id": f"avro-{i}", "prompt": f"avro question {i}", "chosen": chosen, "rejected": "no"})
    value, headers = ValueCodec().encode("PreferencePair", pair, "x")
    return value, tuple(headers)


# Each generator: (index, rng, good pairs) -> Hostile
def _nan(i, rng, good):
    return Hostile("created_at NaN/Infinity", _created(i, rng.choice(["NaN", "Infinity", "-Infinity"])),
                   **_dlq("invalid_value"))


def _1e300(i, rng, good):
    return Hostile("created_at 1e300", _created(i, rng.choice(["1e300", "-1e300", "1.5e308"])), **_dlq("invalid_value"))


def _int64(i, rng, good):
    return Hostile("created_at out of int64", _created(i, str(rng.choice([2**63 + i, -(2**63) - 1 - i, 2**64 + i]))),
                   **_dlq("invalid_value"))


def _digits(i, rng, good):
    field_ = ["created_at", "chosen", "pair_id", "source"][i % 4]
    value = b'{"prompt":"digits %d","chosen":"a","rejected":"b","%s":%s}' % (i, field_.encode(), BIG_NUMBER.encode())
    if field_ == "chosen":
        value = b'{"prompt":"digits %d","rejected":"b","chosen":%s}' % (i, BIG_NUMBER.encode())
    return Hostile("5,000-digit number", value, **_dlq("invalid_number"))


def _terms(i, rng, good):
    pid = f"hostile-terms-{i}"
    return Hostile("1+1+...+1 (5,000 terms)", _json({
        "pair_id": pid, "prompt": "What is " + "+".join(["1"] * 5000) + f"? (#{i})", "chosen": "5000",
        "rejected": "4999", "objectivity": "factual", "task_category": "arithmetic"}), expect="scored", pair_id=pid)


def _tower(i, rng, good):
    pid = f"hostile-tower-{i}"
    prompt = rng.choice(["What is 9^9^9^9?", "What is ((10^100)^100)^100^100?", "What is 2^2^2^2^2^2^2?",
                         "What is (99^99)^(99^99)?"])
    return Hostile("exponent tower", _json({"pair_id": pid, "prompt": f"{prompt} (#{i})", "chosen": "1", "rejected": "2",
                                            "objectivity": "factual", "task_category": "arithmetic"}),
                   expect="scored", pair_id=pid)


def _id_long(i, rng, good):
    return Hostile("pair_id over 128 chars", _json({"pair_id": f"{i}-" + "x" * rng.randint(128, 4000), "prompt": "q",
                                                    "chosen": "a", "rejected": "b"}), **_dlq("invalid_pair_id"))


def _id_chars(i, rng, good):
    bad = rng.choice([f"has space {i}", f"slash/{i}", f"\u00fcn\u00efcode-{i}", f"new\nline-{i}", f"semi;{i}",
                      f"null\u0000{i}", f"emoji-\U0001f600-{i}", f"../../etc/{i}"])
    return Hostile("pair_id bad characters", _json({"pair_id": bad, "prompt": "q", "chosen": "a", "rejected": "b"}),
                   **_dlq("invalid_pair_id"))


def _id_reserved(i, rng, good):
    return Hostile("pair_id ending :expert / :re", _json({"pair_id": f"p{i}" + rng.choice([":expert", ":re"]),
                                                          "prompt": "q", "chosen": "a", "rejected": "b"}),
                   **_dlq("invalid_pair_id"))


def _broken_json(i, rng, good):
    text = json.dumps({"pair_id": f"broken-{i}", "prompt": "q", "chosen": "a", "rejected": "b"})
    cut = rng.randint(text.index(f"broken-{i}") + len(f"broken-{i}"), len(text) - 1)  # keeps the index: unique
    value = text[:cut].encode()
    if value.lstrip()[:1] != b"{":
        value = b'{"prompt": ' + value
    return Hostile("broken JSON", value, **_dlq("invalid_json"))


def _avro_spoofed(i, rng, good):
    garbage = bytes([i % 251]) + rng.randbytes(rng.randint(0, 400))
    return Hostile("Avro: spoofed header, garbage bytes", garbage, headers=(("prefstream-schema", _fingerprint("PreferencePair")),),
                   **_dlq("invalid_avro"))


def _avro_truncated(i, rng, good):
    value, headers = _avro_pair(i, f"fine answer {i}")
    keep = len(f"avro-{i}") + 2  # past the pair_id, so each is unique
    return Hostile("Avro: truncated", value[: rng.randint(keep, len(value) - 1)], headers=headers, **_dlq("invalid_avro"))


def _avro_other_schema(i, rng, good):
    value, _ = _avro_pair(i, f"fine answer {i}")
    fp = _fingerprint(rng.choice(["ScoredPair", "DeadLetter", "Annotation"]))
    return Hostile("Avro: header names another schema", value, headers=(("prefstream-schema", fp),), **_dlq("wrong_schema"))


def _avro_unknown_fp(i, rng, good):
    value, _ = _avro_pair(i, f"fine answer {i}")
    fp = rng.choice([b"0000000000000000", b"not-a-fingerprint", b"\xff\xfe", b"x" * 300])
    return Hostile("Avro: unknown fingerprint", value, headers=(("prefstream-schema", fp),), **_dlq("unknown_schema"))


def _avro_bad_utf8(i, rng, good):
    value, headers = _avro_pair(i, f"XXXX-{i}")
    return Hostile("Avro: invalid UTF-8 string", value.replace(b"XXXX", b"\xff\xfe\xfd\xfc", 1), headers=headers,
                   **_dlq("invalid_avro"))


def _bad_utf8(i, rng, good):
    where = rng.choice(["chosen", "prompt", "rejected"])
    obj = {"pair_id": f"utf8-{i}", "prompt": "q", "chosen": "ok", "rejected": "fine"}
    obj[where] = "MARK"
    value = json.dumps(obj).encode().replace(b"MARK", rng.choice([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"]))
    return Hostile("invalid UTF-8", value, **_dlq("invalid_utf8"))


def _five_mb(i, rng, good):
    value = b'{"prompt":"big %d","chosen":"' % i + b"x" * FIVE_MB + b'","rejected":"b"}'
    return Hostile("5 MB value", value, **_dlq("too_large"))


def _deep(i, rng, good):
    depth = rng.choice([5_000, 50_000, 200_000])
    inner = (b"[" * depth + b"]" * depth) if i % 2 else (b'{"a":' * depth + b"1" + b"}" * depth)
    return Hostile("deep nesting", b'{"prompt": "deep %d", "metadata": ' % i + inner + b"}", **_dlq("invalid_json"))


def _turns(i, rng, good):
    return Hostile("10,000-turn conversation", _json({"pair_id": f"turns-{i}", "conversation": [
        {"role": "user" if t % 2 == 0 else "assistant", "content": f"turn {t}"} for t in range(10_000)],
        "chosen": "a", "rejected": "b"}), **_dlq("too_large"))


def _dup_same(i, rng, good):
    pair = good[(i // len(GENERATORS)) % len(good)]  # each copy of another good pair
    return Hostile("duplicate id (exact copy)", _json(pair), expect="dedup", key=pair["pair_id"].encode(),
                   pair_id=pair["pair_id"], kcat=False)


def _dup_conflict(i, rng, good):
    pair = good[(i // len(GENERATORS) + len(good) // 2) % len(good)]
    other = dict(pair, chosen=f"IMPOSTOR {i}: a different text under the same id", rejected="impostor rejected")
    return Hostile("duplicate id (other text)", _json(other), expect="conflict", key=pair["pair_id"].encode(),
                   pair_id=pair["pair_id"], kcat=False, reasons=frozenset({"duplicate_id_conflict"}))


def _tombstone(i, rng, good):
    return Hostile("null value (tombstone)", None, key=f"tomb-{i}".encode(), kcat=False, **_dlq("empty_value"))


def _binary(i, rng, good):
    return Hostile("binary, no header", b"\x00\x01\x02" + rng.randbytes(rng.randint(1, 64)) + b"%d" % i,
                   **_dlq("unknown_schema"))


GENERATORS: list[Callable] = [_nan, _1e300, _int64, _digits, _terms, _tower, _id_long, _id_chars, _id_reserved,
                              _broken_json, _avro_spoofed, _avro_truncated, _avro_other_schema, _avro_unknown_fp,
                              _avro_bad_utf8, _bad_utf8, _deep, _turns, _dup_same, _dup_conflict, _tombstone, _binary]


def corpus(n: int, good: list[dict], seed: int = 0, five_mb: int | None = None) -> list[Hostile]:
    """``n`` hostile records: the classes round-robin, plus ``five_mb`` 5 MB values (default n // 100,
    at least 1: each is kept whole in prefs.raw and prefs.dlq of the memory-only broker), shuffled."""
    rng = random.Random(seed)
    big = max(1, n // 100) if five_mb is None else five_mb
    out = [GENERATORS[i % len(GENERATORS)](i, rng, good) for i in range(n - big)]
    out += [_five_mb(n - big + j, rng, good) for j in range(big)]
    rng.shuffle(out)
    shas = [h.sha256 for h in out if h.value is not None]
    assert len(shas) == len(set(shas)), "every hostile record must be unique"
    return out
