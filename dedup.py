"""dedup.py: duplicate removal in NumPy: exact duplicates, and near-duplicates by MinHash, LSH and union-find.

    signatures = minhash(*unit_hashes(texts, "char"), ngram=5, num_perm=128)  # (len(texts), 128) uint32
    bands, rows = lsh_bands(0.8, 128)                                           # 18 bands of 7 rows
    roots = near_duplicate_roots(band_keys(signatures, bands, rows), rows, np.ones(len(texts), bool),
                                 lambda docs: signatures[docs], 0.8)  # roots[i] < i: text i is a near-copy

The one idea: a MinHash signature keeps, in each of num_perm bins, the smallest hash among the
document's shingles (its runs of ngram characters or words) that fall into it, and two documents agree
in a bin with probability equal to the Jaccard similarity of their shingle sets (Li, Owen & Zhang,
2012), so agreeing bins estimate it. LSH banding (Leskovec, Rajaraman & Ullman, Mining of Massive
Datasets, ch. 3) spares comparing every pair: documents equal on every row of some band of the
signature become candidate pairs, the bands and rows chosen so that a pair at exactly the threshold is
a candidate with probability 0.95. A candidate whose estimate reaches the threshold is joined,
union-find turns the joined pairs into clusters, and each cluster keeps its earliest document. Exact
duplicates are simpler: equal 128-bit hashes, confirmed by comparing the texts. Nothing here reads a
file: prepare_data.py passes what it needs as functions (signature_rows, read_texts), so the
signatures and texts stay on disk.
"""
from functools import cache

import numpy as np

PAIRS_PER_READ = 1 << 16  # candidate pairs verified at a time: bounds the signature rows in memory
VERIFY_BYTES = 1 << 28  # text of documents with a shared hash compared at a time: bounds that step's memory
EMPTY = np.uint32(0xFFFFFFFF)  # a MinHash bin that no shingle fell into
PRIME = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying by it mod 2**64 loses nothing
POWERS = np.cumprod(np.r_[np.uint64(1), np.full(63, PRIME)])  # PRIME**i mod 2**64, i < 64
SPACE = np.zeros(0x110000, bool)
SPACE[[c for c in range(0x3001) if chr(c).isspace()]] = True  # U+3000 is the last space in Unicode


# ---- MinHash signatures: a few numbers per document that estimate its similarity to another ------

@cache
def char_hashes() -> np.ndarray:
    """A random 64-bit number for every code point; the fixed seed makes it the same everywhere."""
    return np.random.default_rng(20261128).integers(0, 2**64, 0x110000, dtype=np.uint64, endpoint=False)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place: every input bit moves every output bit."""
    x ^= x >> 30
    x *= 0xBF58476D1CE4E5B9
    x ^= x >> 27
    x *= 0x94D049BB133111EB
    x ^= x >> 31
    return x


def unit_hashes(texts: list[str], shingle: str) -> tuple[np.ndarray, np.ndarray]:
    """A 64-bit hash per unit (character, or word: a run of non-space characters) of the texts back
    to back, and the number of units in each text."""
    chars = np.frombuffer("".join(texts).encode("utf-32-le"), np.uint32)
    lengths = np.fromiter(map(len, texts), np.int64, len(texts))
    hashes = char_hashes()[chars]
    if shingle == "char":
        return hashes, lengths
    ends = np.cumsum(lengths)
    inside = np.flatnonzero(~SPACE[chars])  # (characters that belong to a word,)
    first = np.ones(len(inside), bool)  # does this character start a word?
    first[1:] = (inside[1:] != inside[:-1] + 1) | np.isin(inside[1:], ends)
    starts = np.flatnonzero(first)
    if len(starts) == 0:
        return np.zeros(0, np.uint64), np.zeros(len(texts), np.int64)
    place = np.arange(len(inside)) - np.repeat(starts, np.diff(np.r_[starts, len(inside)]))
    # Weighting each character by PRIME**place makes the word hash depend on the order of its letters.
    words = np.add.reduceat(hashes[inside] * POWERS[np.minimum(place, 63)], starts)
    text_of_word = np.searchsorted(ends, inside[starts], side="right")
    return words, np.bincount(text_of_word, minlength=len(texts))


def minhash(units: np.ndarray, counts: np.ndarray, ngram: int, num_perm: int) -> np.ndarray:
    """MinHash signatures (len(counts), num_perm) of the texts' sets of n-unit shingles.

    One permutation hashing (Li, Owen & Zhang, 2012): each shingle is hashed once, the hash picks one
    of num_perm bins, and each bin keeps the smallest hash that falls into it. Two texts agree in a
    bin that either fills with probability equal to their Jaccard similarity, as with num_perm
    independent permutations, at one hash per shingle instead of num_perm. Empty bins stay EMPTY.
    """
    signature = np.full((len(counts), num_perm), EMPTY)
    n = len(units) - ngram + 1
    if n <= 0:
        return signature
    h = units[:n].copy()  # (n,) shingle i = units i .. i + ngram - 1, hashed as a polynomial
    for j in range(1, ngram):
        h *= PRIME
        h += units[j:j + n]
    mix(h)
    values = (h >> 32).astype(np.uint32)  # the high half is the value...
    cut = (np.cumsum(counts)[:-1, None] - np.arange(1, ngram)).ravel()
    values[cut[(cut >= 0) & (cut < n)]] = EMPTY  # (a shingle that runs into the next text adds nothing)
    h &= 0xFFFFFFFF  # ...the low half picks the bin: low * num_perm / 2**32
    h *= num_perm
    h >>= 32
    bins = h.view(np.int64)
    bins += np.repeat(np.arange(0, len(counts) * num_perm, num_perm), counts)[:n]  # into the text's row
    np.minimum.at(signature.reshape(-1), bins, values)
    return signature


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Jaccard similarity of each row pair of signatures: the share of agreeing bins among the bins
    that either fills (a bin empty in both tells nothing; Li, Owen & Zhang, 2012)."""
    filled = (a != EMPTY) | (b != EMPTY)
    return ((a == b) & filled).sum(1) / np.maximum(filled.sum(1), 1)


# ---- LSH banding: candidate pairs without comparing every pair -----------------------------------

def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest chance candidates) that still make a pair at
    exactly the threshold a candidate with probability >= 0.95, i.e. 1 - (1 - t**rows)**bands
    (Leskovec, Rajaraman & Ullman, Mining of Massive Datasets, ch. 3). 0.8 and 128: 18 bands of 7."""
    for rows in range(num_perm, 1, -1):
        if 1 - (1 - threshold**rows) ** (num_perm // rows) >= 0.95:
            return num_perm // rows, rows
    return num_perm, 1


def band_keys(signature: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint32: one hash per band of rows signature values. 32 bits halve the dedup index;
    the price is a chance collision per band per ~2**32 / n documents, which verification then rejects."""
    values = signature[:, :bands * rows].reshape(len(signature), bands, rows).astype(np.uint64)
    key = values[:, :, 0].copy()
    for j in range(1, rows):
        key *= PRIME
        key += values[:, :, j]
    return (mix(key) >> 32).astype(np.uint32)


def candidate_pairs(bands: np.ndarray, rows: int, candidates: np.ndarray) -> np.ndarray:
    """(m, 2) pairs of documents, each pair once and the earlier first, that candidates (a mask) holds
    and that are equal on every row of some band (bands: every document's band_keys). In each band
    the candidates are sorted by key, and neighbours with equal keys pair up."""
    index = np.flatnonzero(candidates)
    empty_band = band_keys(np.full((1, rows), EMPTY), 1, rows)[0, 0]
    codes = []
    for band in range(bands.shape[1]):
        keys = bands[index, band]
        order = np.argsort(keys, kind="stable")  # equal keys side by side, in corpus order
        keys = keys[order]
        same = (keys[1:] == keys[:-1]) & (keys[1:] != empty_band)  # a band no shingle reached proves nothing
        codes.append(index[order[:-1][same]] * len(bands) + index[order[1:][same]])
    codes = np.unique(np.concatenate(codes)) if codes else np.zeros(0, np.int64)
    return np.stack([codes // len(bands), codes % len(bands)], axis=1)


# ---- clusters: the candidate pairs similar enough, joined by union-find --------------------------

def near_duplicate_roots(bands: np.ndarray, rows: int, candidates: np.ndarray, signature_rows,
                         threshold: float) -> np.ndarray:
    """For each document the earliest document of its near-duplicate cluster (itself if it has none).

    A candidate pair (candidate_pairs) is joined when the MinHash estimate of its Jaccard similarity
    reaches the threshold (signature_rows(docs): the signatures of docs); union-find then merges
    joined pairs into clusters, so a chain of near-copies is one cluster.
    """
    pairs = candidate_pairs(bands, rows, candidates)
    similar = np.zeros(len(pairs), bool)
    for s in range(0, len(pairs), PAIRS_PER_READ):
        a, b = pairs[s:s + PAIRS_PER_READ].T
        similar[s:s + PAIRS_PER_READ] = estimated_jaccard(signature_rows(a), signature_rows(b)) >= threshold
    return cluster_roots(len(bands), pairs[similar])


def cluster_roots(n: int, pairs: np.ndarray) -> np.ndarray:
    """Union-find over the pairs, vectorised: every document's root is the smallest index in its cluster.

    Each round hooks the larger root of every pair that still disagrees onto the smaller one, then
    halves all paths until each points at a root; the number of roots falls every round.
    """
    root = np.arange(n)
    a, b = pairs.T
    while (differ := root[a] != root[b]).any():
        ra, rb = root[a[differ]], root[b[differ]]
        np.minimum.at(root, np.maximum(ra, rb), np.minimum(ra, rb))
        while (root[root] != root).any():
            root = root[root]
    return root


# ---- exact duplicates ----------------------------------------------------------------------------

def exact_duplicates(hashes: np.ndarray, lengths: np.ndarray, candidates: np.ndarray, read_texts) -> np.ndarray:
    """True for each candidate whose text an earlier candidate already had.

    Equal 128-bit BLAKE2b hashes almost surely mean equal texts, but a collision must never drop a
    distinct document: the documents whose hash another candidate shares are read again
    (read_texts(docs) yields (doc, UTF-8 text) in corpus order) and their texts compared. Only those
    are re-read, none in a corpus without duplicates; hash groups are compared in batches of
    about VERIFY_BYTES of text, so memory stays bounded however many duplicates there are.
    """
    index = np.flatnonzero(candidates)
    _, group, counts = np.unique(hashes[index], axis=0, return_inverse=True, return_counts=True)
    group = group.ravel()
    shared = counts[group] > 1
    docs, group = index[shared], group[shared]  # (documents with a shared hash,) and their hash group
    group_of = np.full(len(candidates), -1)
    group_of[docs] = group
    group_bytes = np.bincount(group, weights=lengths[docs], minlength=len(counts))
    batch_of_group = (np.cumsum(group_bytes) - group_bytes) // VERIFY_BYTES  # a group never straddles batches
    duplicate = np.zeros(len(candidates), bool)
    for batch in np.unique(batch_of_group[group]):
        texts = {}  # hash group -> the distinct texts met so far (a set compares the bytes themselves)
        for doc, text in read_texts(docs[batch_of_group[group] == batch]):
            seen = texts.setdefault(group_of[doc], set())
            duplicate[doc] = text in seen
            seen.add(text)
    return duplicate
