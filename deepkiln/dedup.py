"""Exact and near-duplicate detection: normalised-text hashes, MinHash signatures and LSH bands,
SimHash fingerprints and their blocked search.

Everything is vectorised over a batch of documents with NumPy: texts become one array of code
points, words (or single CJK characters) are hashed with a polynomial prefix hash, w-unit shingles
are combined from those, and every permutation is a multiply-shift hash. No per-shingle Python.

Shape legend: N documents, U units (words / CJK chars), S shingles, P permutations, Bd bands, Rw rows,
T SimHash tables.
"""

from __future__ import annotations

import functools
import hashlib
from itertools import combinations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

EMPTY = np.uint32(0xFFFFFFFF)  # signature value of a document with no shingle
_MASK64 = (1 << 64) - 1
_P = 0x100000001B3              # prefix-hash base (odd, so invertible mod 2^64)
_Q = 0x9E3779B97F4A7C15         # shingle-combine multiplier
_CJK_RANGES = ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0xAC00, 0xD7AF))


def exact_hash(text: str) -> int:
    """64-bit hash of the text with case and whitespace runs normalised away."""
    key = " ".join(text.lower().split()).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def jaccard_threshold(bands: int, rows: int) -> float:
    """Jaccard similarity at which a pair becomes an LSH candidate with probability about 1/2."""
    return (1.0 / bands) ** (1.0 / rows)


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    return 1.0 - (1.0 - jaccard ** rows) ** bands


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads the linear prefix hash over all 64 bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=2)
def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P^i and P^-i (mod 2^64) for i < n (cached: batches reuse one power-of-two length)."""
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.full(n, _P, dtype=np.uint64))
        inv = np.cumprod(np.full(n, pow(_P, -1, 1 << 64), dtype=np.uint64))
    one = np.ones(1, dtype=np.uint64)
    return np.concatenate([one, powers[:-1]]), np.concatenate([one, inv])


def _unit_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Hash of every unit (maximal word run, or one CJK character) of every text, lower-cased.
    Returns hashes (U,) uint64 and the document index (U,) of each unit, in order."""
    joined = "\x00".join(texts).lower()
    cp = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
    word = ((cp >= 48) & (cp <= 57)) | ((cp >= 97) & (cp <= 122)) | (cp == 95)  # ASCII letters, digits, _
    # Beyond Latin-1's symbols every character is a word character but punctuation and CJK (which
    # is a unit of its own); English text has few such characters, so they are classified apart.
    high = np.flatnonzero(cp >= 0xC0)
    h = cp[high]
    cjk_high = np.zeros(len(h), dtype=bool)
    for lo, hi in _CJK_RANGES:
        cjk_high |= (h >= lo) & (h <= hi)
    punct = ((h >= 0x2000) & (h <= 0x206F)) | ((h >= 0x3000) & (h <= 0x303F)) | ((h >= 0xFF00) & (h <= 0xFF65))
    word[high] = ~punct & ~cjk_high
    cjk = np.zeros(len(cp), dtype=bool)
    cjk[high] = cjk_high
    prev_word = np.concatenate([[False], word[:-1]])
    next_word = np.concatenate([word[1:], [False]])
    starts = np.flatnonzero((word & ~prev_word) | cjk)
    ends = np.flatnonzero((word & ~next_word) | cjk) + 1
    # Polynomial prefix hash: hash(i, j) = (H[j] - H[i]) * P^-i, position independent (mod 2^64).
    powers, inv = _powers(1 << max(len(cp), 1).bit_length())
    with np.errstate(over="ignore"):
        prefix = np.concatenate([[np.uint64(0)], np.cumsum((cp + np.uint64(1)) * powers[:len(cp)])])
        units = _mix((prefix[ends] - prefix[starts]) * inv[starts])
    return units, np.searchsorted(np.flatnonzero(cp == 0), starts)  # separators before: the document


def shingle_hashes(texts: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes (S,) uint64 of every run of `size` consecutive units inside one document, and the
    document index (S,) of each. A document shorter than `size` units contributes no shingle."""
    units, doc = _unit_hashes(texts)
    n = len(units) - size + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    with np.errstate(over="ignore"):
        h = units[:n].copy()
        for k in range(1, size):
            h = h * np.uint64(_Q) + units[k:k + n]
        h = _mix(h)
    same_doc = doc[:n] == doc[size - 1:]
    return h[same_doc], doc[:n][same_doc]


SIGNATURE_VERSION = 2  # of minhash's values: 1 was 64-bit multiply-shift; stored ones of another are redone


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Parameters (a odd, b) of the num_perm permutations x -> a x + b (mod 2^32) of 32-bit values."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1 << 31, size=num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint32)
    return a, b


def _segments(doc: np.ndarray) -> np.ndarray:
    """Start of every run of equal document indices in `doc` (sorted)."""
    return np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])


def minhash(texts: list[str], num_perm: int = 128, shingle_size: int = 5, seed: int = 0,
            chunk: int = 16384) -> np.ndarray:
    """MinHash signatures (N, P) uint32. A document without shingles gets all EMPTY."""
    return minhash_of(*shingle_hashes(texts, shingle_size), len(texts), num_perm, seed, chunk)


def minhash_of(shingles: np.ndarray, doc: np.ndarray, n_docs: int, num_perm: int = 128, seed: int = 0,
               chunk: int = 16384) -> np.ndarray:
    """MinHash signatures (N, P) uint32 of shingle_hashes' output for n_docs documents: the minimum
    of each permutation over the top 32 bits of the document's shingle hashes. Computed as (P, S)
    blocks in 32-bit lanes, each permutation's row reduced per document along contiguous memory
    (3x faster than (S, P) blocks of 64-bit values)."""
    a, b = permutations(num_perm, seed)
    x = (shingles >> np.uint64(32)).astype(np.uint32)
    sig = np.full((num_perm, n_docs), EMPTY, dtype=np.uint32)
    buf = np.empty((num_perm, chunk), dtype=np.uint32)
    for lo in range(0, len(x), chunk):
        s, d = x[lo:lo + chunk], doc[lo:lo + chunk]
        h = buf[:, :len(s)]
        np.multiply(a[:, None], s[None, :], out=h)
        h += b[:, None]
        first = _segments(d)
        docs = d[first]
        sig[:, docs] = np.minimum(sig[:, docs], np.minimum.reduceat(h, first, axis=1))
    return np.ascontiguousarray(sig.T)


SIMHASH_BITS = 64
SIMHASH_REFERENCE_SHINGLES = 100  # documents this long (or longer) get the base Hamming threshold


def simhash_of(shingles: np.ndarray, doc: np.ndarray, n_docs: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """SimHash fingerprints (N,) uint64 and shingle counts (N,) int64 of shingle_hashes' output:
    bit i of a fingerprint is set when bit i is set in more than half of the document's (mixed,
    64-bit) shingle hashes. A document without shingles gets 0 and a count of 0."""
    counts = np.bincount(doc, minlength=n_docs)
    ones = np.zeros((n_docs, SIMHASH_BITS), dtype=np.int64)
    for lo in range(0, len(shingles), chunk):
        s, d = shingles[lo:lo + chunk], doc[lo:lo + chunk]
        bits = np.unpackbits(s.astype("<u8").view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
        first = _segments(d)
        ones[d[first]] += np.add.reduceat(bits.astype(np.int32), first, axis=0)
    majority = 2 * ones > counts[:, None]
    fingerprints = np.packbits(majority, axis=1, bitorder="little").view("<u8").ravel().astype(np.uint64)
    return fingerprints, counts


def simhash(texts: list[str], shingle_size: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """SimHash fingerprints (N,) uint64 and shingle counts (N,) of the texts."""
    return simhash_of(*shingle_hashes(texts, shingle_size), len(texts))


def simhash_threshold(shingles: np.ndarray, distance: int, max_distance: int) -> np.ndarray:
    """The Hamming threshold for documents of `shingles` shingles: `distance` at
    SIMHASH_REFERENCE_SHINGLES or more, growing as sqrt(reference / shingles) for shorter ones (a
    fixed number of edited words changes a share of shingles ~ 1/n, and the expected distance grows
    with the square root of that share), capped at `max_distance`."""
    scaled = np.rint(distance * np.sqrt(SIMHASH_REFERENCE_SHINGLES / np.maximum(shingles, 1)))
    return np.clip(scaled, distance, max_distance).astype(np.int64)


def simhash_masks(max_distance: int) -> list[int]:
    """Blocked search for pairs within `max_distance`: the 64 bits are cut into max_distance + 2
    contiguous blocks; at most max_distance of them can differ, so two of them agree, and every pair
    of blocks is one table (its mask). Exact: no pair within the distance is missed."""
    edges = np.linspace(0, SIMHASH_BITS, max_distance + 3).round().astype(int)
    blocks = [((1 << int(hi)) - 1) ^ ((1 << int(lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:])]
    return [a | b for a, b in combinations(blocks, 2)]


def simhash_keys(fingerprints: np.ndarray, max_distance: int) -> np.ndarray:
    """Blocked-search keys (N, T) uint64: each table's masked fingerprint, mixed."""
    masks = np.array(simhash_masks(max_distance), dtype=np.uint64)
    return _mix(fingerprints[:, None] & masks)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between two uint64 fingerprint arrays."""
    return np.bitwise_count(a ^ b).astype(np.int64)


def simhash_close(fp_a: np.ndarray, fp_b: np.ndarray, n_a: np.ndarray, n_b: np.ndarray, distance: int,
                  max_distance: int) -> np.ndarray:
    """Which pairs are near duplicates: within the Hamming threshold of the shorter document."""
    return hamming(fp_a, fp_b) <= simhash_threshold(np.minimum(n_a, n_b), distance, max_distance)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """LSH band keys (N, Bd) uint64: a hash of each band's `rows` signature values."""
    if bands * rows > sig.shape[1]:
        raise ValueError(f"data.bands x data.rows = {bands * rows} exceeds data.num_perm = {sig.shape[1]}")
    v = sig[:, :bands * rows].reshape(len(sig), bands, rows).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = np.zeros(v.shape[:2], dtype=np.uint64)
        for r in range(rows):
            h = _mix(h * np.uint64(_Q) + v[:, :, r])
    return h


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Share of equal signature values, row by row: an unbiased Jaccard estimate."""
    return (a == b).mean(axis=-1)


def bucket_pairs(band: np.ndarray, key: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Candidate pairs (K, 2) int64 from (band, key, doc id) triples: within each bucket holding
    more than one document, every member is paired with the bucket's lowest id."""
    if len(ids) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    order = np.lexsort((ids, key, band))
    band, key, ids = band[order], key[order], ids[order]
    new = np.r_[True, (band[1:] != band[:-1]) | (key[1:] != key[:-1])]
    head = ids[np.maximum.accumulate(np.where(new, np.arange(len(ids)), 0))]  # lowest id of the bucket
    pairs = np.stack([head, ids], axis=1)[~new]
    return np.unique(pairs[pairs[:, 0] != pairs[:, 1]], axis=0)


def duplicates_to_drop(pairs: np.ndarray, keep_below: int = 0) -> tuple[np.ndarray, int]:
    """Connected components of the duplicate pairs; all but the lowest id of each are dropped.
    Ids below `keep_below` (already published) are never dropped. Returns (sorted drops, clusters)."""
    if len(pairs) == 0:
        return np.zeros(0, dtype=np.int64), 0
    nodes, inverse = np.unique(pairs, return_inverse=True)
    inverse = inverse.reshape(pairs.shape)
    graph = coo_matrix((np.ones(len(pairs)), (inverse[:, 0], inverse[:, 1])), shape=(len(nodes),) * 2)
    n_clusters, label = connected_components(graph, directed=False)
    lowest = np.full(n_clusters, np.iinfo(np.int64).max)
    np.minimum.at(lowest, label, nodes)
    drop = nodes[nodes != lowest[label]]
    return np.sort(drop[drop >= keep_below]), n_clusters
