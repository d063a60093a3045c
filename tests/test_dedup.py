"""dedup.py: MinHash estimates Jaccard, LSH catches pairs at the threshold, union-find and exact dedup are exact."""
import numpy as np
import pytest

import dedup
from dedup import band_keys, cluster_roots, estimated_jaccard, lsh_bands, minhash, near_duplicate_roots, unit_hashes


def words(rng, n: int) -> str:
    """n random pronounceable words: text that shares almost no 5-character shingles with other such text."""
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "zu", "an", "el", "or", "ix", "um"]
    return " ".join("".join(rng.choice(syllables, rng.integers(2, 5))) for _ in range(n))


def shingles(text: str, n: int = 5) -> set[str]:
    return {text[i:i + n] for i in range(len(text) - n + 1)}


def jaccard(a: str, b: str) -> float:
    return len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))


def test_minhash_estimates_the_jaccard_similarity_of_shingle_sets():
    rng = np.random.default_rng(1)
    base = words(rng, 400)
    # A shared start and new words after it: Jaccard similarity about 0.9, 0.67, 0.33 and 0.1, then 0.
    texts = [base] + [base[:int(len(base) * f)] + " " + words(rng, int(400 * (1 - f))) for f in (0.95, 0.8, 0.5, 0.2)]
    texts.append(words(rng, 400))
    word_texts = [" ".join(t.split()[::-1]) for t in texts]  # same words, other order: other word shingles
    def word_shingles(text):
        return {tuple(text.split()[i:i + 5]) for i in range(len(text.split()) - 4)}

    for unit, batch, reference in (("char", texts, shingles), ("word", word_texts, word_shingles)):
        signatures = minhash(*unit_hashes(batch, unit), 5, 256)
        for text, signature in zip(batch[1:], signatures[1:]):
            exact = len(reference(batch[0]) & reference(text)) / len(reference(batch[0]) | reference(text))
            assert abs(estimated_jaccard(signatures[:1], signature[None])[0] - exact) < 0.1  # ~3 sigma
        # A batch is only a speed-up: no shingle spans two texts, so each signature is the text's own.
        alone = np.concatenate([minhash(*unit_hashes([t], unit), 5, 256) for t in batch])
        assert (signatures == alone).all()


def test_lsh_bands_catch_pairs_at_the_threshold():
    for threshold, num_perm in ((0.8, 128), (0.5, 64), (0.95, 256)):
        bands, rows = lsh_bands(threshold, num_perm)
        assert bands * rows <= num_perm
        assert 1 - (1 - threshold**rows) ** bands >= 0.95
        assert 1 - (1 - threshold**(rows + 1)) ** (num_perm // (rows + 1)) < 0.95  # one more row would miss
    assert lsh_bands(0.8, 128) == (18, 7)


def test_cluster_roots_match_a_plain_union_find():
    rng = np.random.default_rng(2)
    for n, n_pairs in ((50, 0), (50, 30), (300, 200), (300, 1000)):
        pairs = rng.integers(0, n, (n_pairs, 2))
        parent = list(range(n))

        def find(i):
            while parent[i] != i:
                i = parent[i]
            return i
        for a, b in pairs.tolist():
            parent[find(a)] = find(b)
        members = {}
        for i in range(n):
            members.setdefault(find(i), []).append(i)
        expected = [min(members[find(i)]) for i in range(n)]
        assert cluster_roots(n, pairs).tolist() == expected


@pytest.mark.parametrize("verify_bytes", [1 << 28, 100])  # one batch; many batches of hash groups
def test_exact_duplicates_compare_texts_so_a_hash_collision_keeps_distinct_documents(monkeypatch, verify_bytes):
    monkeypatch.setattr(dedup, "VERIFY_BYTES", verify_bytes)
    texts = [f"document {i}".encode() for i in np.random.default_rng(3).integers(0, 40, 300)]
    # A hash with only three values: nearly every pair of distinct texts collides.
    hashes = np.array([[len(t) % 3, 0] for t in texts], np.uint64)
    lengths = np.array([len(t) for t in texts])
    candidates = np.arange(300) % 7 != 0
    seen, expected = set(), []
    for text, candidate in zip(texts, candidates):
        expected.append(bool(candidate and text in seen))
        seen |= {text} if candidate else set()
    read = []

    def read_texts(docs):
        assert (np.diff(docs) > 0).all()  # corpus order, each document once
        read.extend(docs.tolist())
        return ((d, texts[d]) for d in docs)

    assert dedup.exact_duplicates(hashes, lengths, candidates, read_texts).tolist() == expected
    assert sorted(read) == np.flatnonzero(candidates).tolist()
    read.clear()
    distinct = np.arange(600, dtype=np.uint64).reshape(300, 2)
    assert not dedup.exact_duplicates(distinct, lengths, candidates, read_texts).any() and read == []


def test_near_duplicate_roots_keep_the_earliest_near_copy_among_the_candidates():
    rng = np.random.default_rng(4)
    base = words(rng, 300)
    texts = [base, words(rng, 300), base + " " + words(rng, 5), words(rng, 300), words(rng, 3) + " " + base,
             "abc", "abc"]  # too short for a shingle: their empty signatures join nothing
    for copy in (texts[2], texts[4]):
        assert 0.8 < jaccard(base, copy) < 1
    signatures = minhash(*unit_hashes(texts, "char"), 5, 128)
    bands, rows = lsh_bands(0.8, 128)
    keys = band_keys(signatures, bands, rows)

    def roots(candidates):
        return near_duplicate_roots(keys, rows, candidates, lambda docs: signatures[docs], 0.8).tolist()
    assert roots(np.ones(7, bool)) == [0, 1, 0, 3, 0, 5, 6]
    assert roots(np.arange(7) != 0) == [0, 1, 2, 3, 2, 5, 6]  # without document 0, its first copy stays
