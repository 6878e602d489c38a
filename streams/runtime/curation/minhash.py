"""MinHash signatures of texts, for near-duplicate and contamination checks.

A text is normalised (case folded, whitespace runs made one space), cut into tokens (words,
numbers, single punctuation marks, and single characters of scripts written without spaces) and
hashed as the set of its token 3-grams (shingles); a text of fewer tokens is one shingle. Word
shingles make a changed number or name change every shingle it is in, so short templated pairs that
differ in one value ("Capital number 12?" against "Capital number 112?") stay apart, while a long
text with a few words edited keeps most of its shingles. The signature is the minimum of NUM_PERM
hash functions over the shingle set; the share of equal positions of two signatures estimates the
Jaccard similarity of the two shingle sets (standard error about 0.05 at 0.8 with 64 functions).

Locality-sensitive hashing cuts a signature into BANDS bands of ROWS values: two texts with Jaccard
similarity s share at least one band with probability 1 - (1 - s**ROWS)**BANDS (0.99 at s = 0.7,
0.64 at s = 0.5), so candidates are found by band lookups and then checked against the threshold.

Everything is pure numpy with fixed seeds: the same text gives the same signature in every process,
which the Redis-held state shared by several workers relies on.
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

SHINGLE = 3  # tokens per shingle
NUM_PERM = 64
BANDS, ROWS = 16, 4
# Shingles hashed at once: bounds the (chunk x NUM_PERM) work array of a long text to 4 MiB.
_CHUNK = 8192
_WS = re.compile(r"\s+")
# CJK, kana and hangul characters are tokens on their own: those scripts put no spaces between words.
_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\W\d_]+|\d+|[^\w\s]")
_rng = np.random.default_rng(0x5EED_0F_D0D0)
# Multiply-add-shift hashing of 32-bit keys: ((a * x + b) mod 2**64) >> 32 with random 64-bit a (odd), b.
_A = _rng.integers(1, 2**63, size=NUM_PERM, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
_B = _rng.integers(0, 2**63, size=NUM_PERM, dtype=np.uint64)
_POLY = np.uint64(1_000_003)
_EMPTY = np.full(NUM_PERM, np.iinfo(np.uint32).max, dtype=np.uint32)


def normalise(text: str) -> str:
    """Case folded, whitespace runs as one space, trimmed: what 'the same text' means here."""
    return _WS.sub(" ", text.casefold()).strip()


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads the polynomial hash's bits so the top 32 are usable."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def shingles(*texts: str) -> np.ndarray:
    """32-bit hashes of the normalised texts' token 3-grams, unique; a text of fewer tokens is one shingle.

    All texts are hashed in one pass (no shingle spans two texts): a pair is several short texts, and
    numpy's per-call cost would otherwise be most of the time."""
    tokens: list[str] = []
    lengths: list[int] = []
    for text in texts:
        found = _TOKEN.findall(normalise(text))
        if found:
            found += [""] * (SHINGLE - len(found))  # a short text is padded to one whole shingle
            tokens += found
            lengths.append(len(found))
    if not tokens:
        return np.zeros(0, dtype=np.uint64)
    # Tokens never hold whitespace, so a newline separates them; one encode for the lot.
    parts = "\n".join(tokens).encode("utf-8", "surrogatepass").split(b"\n")
    codes = np.fromiter(map(zlib.crc32, parts), dtype=np.uint64, count=len(parts))
    owner = np.repeat(np.arange(len(lengths)), lengths)
    n = len(codes) - SHINGLE + 1
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):  # the polynomial wraps modulo 2**64 on purpose
        for j in range(SHINGLE):
            h = h * _POLY + codes[j:j + n]
        return np.unique(_mix(h[owner[:n] == owner[SHINGLE - 1:]]) >> np.uint64(32))


def signature(*texts: str) -> np.ndarray:
    """The MinHash signature (NUM_PERM uint32) of the union of the texts' shingles: the texts' order does not matter."""
    return sketch(*texts)[0]


def sketch(*texts: str) -> tuple[np.ndarray, int]:
    """The texts' signature and how many distinct shingles it summarises."""
    keys = shingles(*texts)
    if not len(keys):
        return _EMPTY.copy(), 0
    sig = np.full(NUM_PERM, np.iinfo(np.uint64).max, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, len(keys), _CHUNK):
            x = keys[start:start + _CHUNK, None]
            sig = np.minimum(sig, ((_A[None, :] * x + _B[None, :]) >> np.uint64(32)).min(axis=0))
    return sig.astype(np.uint32), len(keys)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity of the shingle sets behind two signatures."""
    return float(np.mean(a == b))


def band_keys(sig: np.ndarray) -> list[str]:
    """One short key per LSH band: texts sharing a key are candidates."""
    return [f"{b}:{hashlib.blake2b(sig[b * ROWS:(b + 1) * ROWS].tobytes(), digest_size=8).hexdigest()}"
            for b in range(BANDS)]


def to_text(sig: np.ndarray) -> str:
    return sig.astype("<u4").tobytes().hex()


def from_text(text: str | bytes) -> np.ndarray | None:
    """A signature stored by ``to_text``; None for anything else (a foreign or truncated value)."""
    try:
        raw = bytes.fromhex(text.decode() if isinstance(text, bytes) else text)
    except (ValueError, UnicodeDecodeError):
        return None
    return np.frombuffer(raw, dtype="<u4").astype(np.uint32) if len(raw) == 4 * NUM_PERM else None
