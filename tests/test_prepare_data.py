"""prepare_data.py: the .bin files decode to the kept documents; dedup, filters, formats, resume, bad input."""
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import prepare_data
from prepare_data import (MAX_WARNINGS, choose_validation, cluster_roots, estimated_jaccard,
                          lsh_bands, main, minhash, parse_args, plan_shards, resolve_inputs, shard_documents,
                          stdlib_sources, unit_hashes)
from tokenizer import EOS_ID, Tokenizer

REPO = Path(__file__).resolve().parent.parent

CODE = '''def mean(xs):
    """Arithmetic mean; raises on an empty list."""
    if not xs:
        raise ValueError("mean of nothing")
    return sum(xs) / len(xs)


class Queue:
\tdef __init__(self):
\t\tself.items = []
'''
CHINESE = "春天来了，河边的柳树发芽了。孩子们在草地上放风筝，笑声传得很远。\n"
RECORDS = [CHINESE * 3, "short record 😀", CODE, "  indented\n\tand tabbed  ",
           "第二条记录：数据准备。"]


def write_corpus(folder: Path) -> Path:
    """Text files and a JSONL file, with exact duplicates across and within them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a_code.txt").write_text(CODE * 4)
    (folder / "b_zh.txt").write_text(CHINESE * 8)
    (folder / "c_emoji.txt").write_text("release 🚀 done ✅\nnext\t\tstep\n")
    (folder / "d_copy_of_code.txt").write_text(CODE * 4)
    (folder / "ignored.md").write_text("not picked up from a folder")
    lines = [json.dumps({"text": t, "id": i}, ensure_ascii=i % 2 == 0) for i, t in enumerate(RECORDS)]
    lines += [json.dumps({"text": CHINESE * 8}), json.dumps({"text": RECORDS[1], "source": "again"})]
    (folder / "e_records.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def reference_documents(folder: Path) -> tuple[list[str], int]:
    """The corpus read naively, all in memory: (unique documents in order, duplicates)."""
    texts = []
    for path in sorted(str(p) for p in folder.rglob("*") if p.suffix in (".txt", ".jsonl")):
        if path.endswith(".jsonl"):
            texts += [json.loads(line)["text"] for line in Path(path).read_text().split("\n") if line]
        else:
            texts.append(Path(path).read_text(encoding="utf-8"))
    unique = list(dict.fromkeys(texts))
    return unique, len(texts) - len(unique)


def decode_documents(out: Path, split: str) -> list[str]:
    """The documents of a split, cut where its doc index says; each must end with </s>."""
    meta = json.loads((out / "meta.json").read_text())
    ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
    starts = np.load(out / meta["doc_index"][split])
    assert len(ids) == meta[f"{split}_tokens"] and len(starts) == meta[f"{split}_documents"]
    ends = np.r_[starts[1:], len(ids)]
    assert starts[0] == 0 and (ids[ends - 1] == EOS_ID).all() and (ids == EOS_ID).sum() == len(starts)
    tok = Tokenizer(str(out / "tokenizer.model"))
    return [tok.decode(ids[start:end - 1]) for start, end in zip(starts, ends)]


def kept_documents(out: Path) -> list[str]:
    return decode_documents(out, "train") + decode_documents(out, "val")


def run_cli(*args, cwd, script=None):
    command = ["-c", script] if script else [str(REPO / "prepare_data.py")]
    return subprocess.run([sys.executable, *command, *args], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.suffix != ".tmp"}


def read_corpus(paths: list[str], *flags: str, shard_bytes: int = 1 << 20) -> list[tuple[str, str]]:
    """(file:line, text) of every document, read in this process the way the workers read them."""
    args = parse_args(list(flags))
    shards, _ = plan_shards(paths, shard_bytes, args.text_field)
    prepare_data.worker.update(paths=paths, shards=shards, args=args)
    found, logs = [], []
    for k in range(len(shards)):
        logs.append(prepare_data.Log())
        found += [(k, piece, line, data) for piece, line, data in shard_documents(k, logs[-1])]
    offsets = prepare_data.line_offsets(shards, [{"piece_lines": log.piece_lines} for log in logs])
    return [(paths[shards[k][piece][0]], offsets[k][piece] + line, data.decode()) for k, piece, line, data in found]


def words(rng, n: int) -> str:
    """n random pronounceable words: text that shares almost no 5-character shingles with other such text."""
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "zu", "an", "el", "or", "ix", "um"]
    return " ".join("".join(rng.choice(syllables, rng.integers(2, 5))) for _ in range(n))


def shingles(text: str, n: int = 5) -> set[str]:
    return {text[i:i + n] for i in range(len(text) - n + 1)}


def jaccard(a: str, b: str) -> float:
    return len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))


def test_bins_decode_to_the_documents(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    # Exact duplicates only: CHINESE * 3 and CHINESE * 8 have the same shingles, so they are near-duplicates.
    main(["--input", str(corpus), "--out", str(out), "--vocab_size", "500", "--val_fraction", "0.2",
          "--no_near_dedup"])
    expected, duplicates = reference_documents(corpus)
    train, val = decode_documents(out, "train"), decode_documents(out, "val")
    assert sorted(train + val) == sorted(expected)
    assert train == [d for d in expected if d in train] and val == [d for d in expected if d in val]
    assert len(val) == round(0.2 * len(expected))
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["train_documents"], meta["val_documents"]) == (len(train), len(val))
    assert meta["duplicates_removed"] == duplicates == 3
    assert meta["duplicate_bytes_removed"] == len(CODE * 4) + len((CHINESE * 8).encode()) + len(RECORDS[1].encode())
    assert meta["bytes_read"] == sum(p.stat().st_size for p in corpus.iterdir() if p.suffix != ".md")
    assert meta["tokenizer_sha256"] == hashlib.sha256((out / "tokenizer.model").read_bytes()).hexdigest()
    assert meta["dtype"] == "uint16" and meta["skipped"] == {} and meta["near_dedup"] is None
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.model", "train.bin",
                                                     "train_doc_index.npy", "val.bin", "val_doc_index.npy"]


def test_split_is_seeded_and_by_document(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    runs = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        out = tmp_path / name
        if name != "a":  # same tokenizer, so only the split can differ
            out.mkdir()
            shutil.copy(tmp_path / "a" / "tokenizer.model", out)
        main(["--input", str(corpus), "--out", str(out), "--vocab_size", "500", "--val_fraction", "0.3",
              "--seed", seed, "--workers", "1"])
        runs[name] = snapshot(out)
    assert runs["a"] == runs["b"]
    assert runs["a"]["val.bin"] != runs["c"]["val.bin"]
    expected, _ = reference_documents(corpus)
    assert set(kept_documents(tmp_path / "c")) <= set(expected)  # whole documents only


def test_choose_validation_takes_at_least_one_and_never_all():
    assert choose_validation(2, 0.01, 0).sum() == 1
    assert choose_validation(3, 0.99, 0).sum() == 2
    assert choose_validation(1000, 0.01, 0).sum() == 10
    assert (choose_validation(1000, 0.01, 5) == choose_validation(1000, 0.01, 5)).all()


def near_duplicate_corpus(folder: Path) -> dict[str, list[str]]:
    """A JSONL file of distinct articles, near-copies of some, and letters filled into one template."""
    rng = np.random.default_rng(0)
    article = [words(rng, 60) + "." for _ in range(6)]
    code = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    originals = ["\n\n".join(article) + "\n\nPosted by alice on Monday.",
                 "# Copyright 2019 Example Corp. Licensed under the MIT License; see LICENSE.\n" + code]
    copies = ["\n\n".join(article) + "\n\nShared by bob via mail, 3 comments.",  # another footer
              "\n\n".join(article[3:] + article[:3]) + "\n\nPosted by alice on Monday.",  # paragraphs reordered
              "# SPDX-License-Identifier: Apache-2.0\n# (c) 2021 Other Org, all rights reserved.\n" + code]
    template = "Dear {},\n\nthank you for your order no. {}. {}\n\nKind regards,\nthe shop team"
    letters = [template.format(words(rng, 2), 1000 + i, words(rng, 40)) for i in range(4)]
    distinct = [words(rng, 80) for _ in range(4)]
    documents = [originals[0], distinct[0], letters[0], copies[0], originals[1], letters[1], distinct[1],
                 copies[1], letters[2], distinct[2], copies[2], letters[3], distinct[3]]
    folder.mkdir()
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    return {"originals": originals, "copies": copies, "letters": letters, "distinct": distinct}


def test_near_duplicates_are_removed_and_template_documents_kept(tmp_path):
    docs = near_duplicate_corpus(tmp_path / "corpus")
    # The premise, measured exactly: each copy is above the default threshold, the letters far below it.
    for copy, original in zip(docs["copies"], docs["originals"][:1] * 2 + docs["originals"][1:]):
        assert 0.8 < jaccard(copy, original) < 1
    assert max(jaccard(a, b) for i, a in enumerate(docs["letters"]) for b in docs["letters"][i + 1:]) < 0.3
    out, report = tmp_path / "out", tmp_path / "report.jsonl"
    main(["--input", str(tmp_path / "corpus"), "--out", str(out), "--vocab_size", "400",
          "--val_fraction", "0.1", "--dedup_report", str(report)])
    assert sorted(kept_documents(out)) == sorted(docs["originals"] + docs["letters"] + docs["distinct"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["near_duplicates_removed"] == 3 and meta["near_duplicate_clusters"] == 2
    assert meta["near_duplicate_bytes_removed"] == sum(len(c.encode()) for c in docs["copies"])
    assert meta["near_dedup"] == {"threshold": 0.8, "shingle": "char", "ngram": 5, "num_perm": 128,
                                  "bands": 18, "rows": 7}
    pairs = [json.loads(line) for line in report.read_text().splitlines()]
    path = str(tmp_path / "corpus" / "docs.jsonl")
    assert {(p["removed"], p["kept"]) for p in pairs} == {
        (f"{path}:4", f"{path}:1"), (f"{path}:8", f"{path}:1"), (f"{path}:11", f"{path}:5")}
    for p in pairs:
        assert abs(p["jaccard"] - jaccard(p["removed_text"], p["kept_text"])) < 0.1
    assert [p["jaccard"] for p in pairs] == sorted(p["jaccard"] for p in pairs)


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
    monkeypatch.setattr(prepare_data, "VERIFY_BYTES", verify_bytes)
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

    assert prepare_data.exact_duplicates(hashes, lengths, candidates, read_texts).tolist() == expected
    assert sorted(read) == np.flatnonzero(candidates).tolist()
    read.clear()
    distinct = np.arange(600, dtype=np.uint64).reshape(300, 2)
    assert not prepare_data.exact_duplicates(distinct, lengths, candidates, read_texts).any() and read == []


def test_output_is_identical_for_any_workers_shards_and_shard_order(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    near_duplicate_corpus(corpus / "more")
    runs = [("one", ["--workers", "1"]), ("many", ["--workers", "2", "--shard_mb", "0.0003"]),
            ("reversed", ["--workers", "2", "--shard_mb", "0.0003"])]
    for name, flags in runs:
        if name != "one":
            (tmp_path / name).mkdir()
            shutil.copy(tmp_path / "one" / "tokenizer.model", tmp_path / name)
        if name == "reversed":  # each shard on its own, last shard first
            run_shards = prepare_data.run_shards
            monkeypatch.setattr(prepare_data, "run_shards", lambda pool, task, jobs, sizes, desc: [
                run_shards(pool, task, [job], sizes, desc) for job in reversed(jobs)])
        main(["--input", str(corpus), "--out", str(tmp_path / name), "--vocab_size", "500", *flags])
    meta = {name: json.loads((tmp_path / name / "meta.json").read_text()) for name, _ in runs}
    assert meta["one"]["shards"] == 1 and meta["many"]["shards"] > 10 and meta["one"]["near_duplicates_removed"] > 3
    one = snapshot(tmp_path / "one")
    del one["meta.json"]
    for name in ("many", "reversed"):
        assert {k: v for k, v in snapshot(tmp_path / name).items() if k != "meta.json"} == one
        assert {**meta[name], "shards": 1} == meta["one"]


KILLED_RUN = """
import os, signal, sys
import prepare_data
run_shards = prepare_data.run_shards

def die_after_one_shard(pool, task, jobs, sizes, desc):
    if task.__name__ == sys.argv[1]:
        run_shards(pool, task, jobs[:1], sizes, desc)  # one shard is finished,
        pool.map_async(task, jobs[1:])                 # others are under way,
        os.kill(os.getpid(), signal.SIGKILL)           # and the run is killed
    run_shards(pool, task, jobs, sizes, desc)

prepare_data.run_shards = die_after_one_shard
prepare_data.main(sys.argv[2:])
"""


def test_resume_after_a_kill_gives_identical_files(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    near_duplicate_corpus(corpus / "more")
    flags = ["--input", "corpus", "--out", "out", "--vocab_size", "500", "--shard_mb", "0.0005"]

    def killed_in(task, *more):
        process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, task, *flags, *more], cwd=tmp_path,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                   env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1"),
                                   start_new_session=True)
        stdout = process.communicate()[0]
        try:
            os.killpg(process.pid, signal.SIGKILL)  # its orphaned workers
        except ProcessLookupError:
            pass
        assert process.returncode == -signal.SIGKILL and not (tmp_path / "out" / "meta.json").exists()
        return stdout

    killed_in("scan_shard")
    stdout = killed_in("tokenize_shard", "--resume")
    assert "already scanned" in stdout and "already tokenized" not in stdout
    other = run_cli(*flags, "--resume", "--seed", "7", cwd=tmp_path)
    assert other.returncode == 1 and "was left by a run with other inputs or arguments" in other.stderr
    resumed = run_cli(*flags, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"resuming: \d+ of \d+ shards already scanned", resumed.stdout)
    assert re.search(r"resuming: \d+ of \d+ shards already tokenized", resumed.stdout)
    assert not (tmp_path / "out" / "work").exists()
    (tmp_path / "fresh").mkdir()
    shutil.copy(tmp_path / "out" / "tokenizer.model", tmp_path / "fresh")
    assert run_cli(*flags, "--out", "fresh", cwd=tmp_path).returncode == 0  # the last --out counts
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "fresh")


def write_formats(folder: Path, records: list) -> list[str]:
    """The same records (None: a missing text) as JSONL, gzip and zstd JSONL, and Parquet in row groups of 2."""
    folder.mkdir()
    lines = "".join(json.dumps({"content": r} if r is not None else {"other": 1}) + "\n" for r in records).encode()
    (folder / "a.jsonl").write_bytes(lines)
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(lines))
    (folder / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"id": range(len(records)), "content": records}), folder / "d.parquet", row_group_size=2)
    return resolve_inputs([str(folder)])


def test_each_input_format_round_trips(tmp_path):
    records = ["first 😀", None, CODE, "第二条记录", CHINESE * 2, "x" * 3000, "", "last\n"]
    paths = write_formats(tmp_path / "corpus", records)
    assert [Path(p).name for p in paths] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet"]
    expected = [(line, text) for line, text in enumerate(records, 1) if text]
    for shard_bytes in (1 << 20, 100):  # whole files, and files cut into many pieces
        documents = read_corpus(paths, "--text_field", "content", shard_bytes=shard_bytes)
        for path in paths:
            assert [(line, text) for p, line, text in documents if p == path] == expected
    out = tmp_path / "out"
    main(["--input", str(tmp_path / "corpus"), "--out", str(out), "--text_field", "content", "--vocab_size", "400",
          "--shard_mb", "0.0001"])
    assert sorted(kept_documents(out)) == sorted(text for _, text in expected)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["duplicates_removed"] == 3 * len(expected)
    assert meta["skipped"] == {"malformed JSONL lines": 3, "malformed Parquet rows": 1, "empty documents": 4}


def test_long_documents_become_chunks_at_line_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, "CHUNK_BYTES", 256)
    text = "".join(f"line {i} 中文\n" for i in range(300)) + "长" * 400
    (tmp_path / "big.txt").write_text(text)
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": text}) + "\n")
    documents = read_corpus(resolve_inputs([str(tmp_path)]))
    for path in ("big.jsonl", "big.txt"):
        chunks = [t.encode() for p, _, t in documents if p.endswith(path)]
        assert len(chunks) > 10 and b"".join(chunks) == text.encode()
        assert all(len(c) <= 256 for c in chunks)
        # A chunk ends mid-line only when it holds part of a line too long for any chunk.
        assert all(c.endswith(b"\n") or "\n" not in c.decode() for c in chunks)
    txt_lines = [line for p, line, _ in documents if p.endswith("big.txt")]
    assert txt_lines[0] == 1 and txt_lines == sorted(txt_lines) and txt_lines[-1] > 250  # where each chunk starts


def test_quality_filters_drop_documents_and_count_each(tmp_path):
    documents = {
        "keep": [CODE, CHINESE + RECORDS[4], "Mixed: 中文 and English.\nWith code `x = 1`, fine."],
        "min_chars": ["tiny"],
        "max_symbol_fraction": ["╔══════╗\n║ ★★ ☺ ║\n╚══════╝ menu ▶▶▶ ●●●"],
        "scripts": ["Привет, мир! Это документ на русском языке."],
        "max_repeated_lines": ["click here\nbuy now\n" * 5 + "the end\n"],
    }
    lines = [json.dumps({"text": d}) + "\n" for ds in documents.values() for d in ds]
    (tmp_path / "docs.jsonl").write_text("".join(lines))
    out = tmp_path / "out"
    main(["--input", str(tmp_path / "docs.jsonl"), "--out", str(out), "--vocab_size", "400", "--val_fraction", "0.3",
          "--min_chars", "10", "--max_symbol_fraction", "0.3", "--scripts", "cjk", "latin",
          "--max_repeated_lines", "0.3"])
    assert sorted(kept_documents(out)) == sorted(documents["keep"])
    assert json.loads((out / "meta.json").read_text())["filtered"] == {
        "min_chars": 1, "max_symbol_fraction": 1, "scripts": 1, "max_repeated_lines": 1}


def test_val_input_forms_the_validation_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = [f"{i}: {CHINESE if i % 3 else CODE}" for i in range(60)]
    head, tail = "".join(lines[:54]), "".join(lines[54:])
    Path("head.txt").write_text(head)
    Path("tail.txt").write_text(tail)
    main(["--input", "head.txt", "--val_input", "tail.txt", "--vocab_size", "500"])
    out = Path("data/head")  # the default folder is named after the single input
    assert decode_documents(out, "train") == [head]
    assert decode_documents(out, "val") == [tail]


def test_stdlib_sources_are_python_files_outside_site_packages():
    files = stdlib_sources()
    assert len(files) > 500 and all(f.endswith(".py") for f in files)
    assert not any("site-packages" in Path(f).parts for f in files)
    assert any(Path(f).parts[-2:] == ("json", "decoder.py") for f in files)


@pytest.mark.parametrize("args, message", [
    (["--input", "missing.txt"], "no such file or folder: missing.txt"),
    (["--input", "corpus/*.csv", "--out", "o"], "no file matches the pattern corpus/*.csv"),
    (["--input", "empty_folder"], "folder empty_folder holds no .txt, .jsonl (.gz, .zst) or .parquet files"),
    (["--input", "corpus/empty.txt", "corpus/bad.jsonl", "--out", "o"], "the corpus has no documents"),
    (["--input", "corpus/one.txt"], "the corpus is a single document"),
    (["--input", "corpus", "--vocab_size", "20"], "vocab_size must be between"),
    (["--input", "corpus", "--val_fraction", "1.5"], "--val_fraction must be between 0 and 1"),
    (["--input", "corpus/one.txt", "corpus/empty.txt"], "pass --out"),
    (["--input", "corpus/no_text.parquet"],
     'corpus/no_text.parquet has no string column "text" (its columns: id, body)'),
    (["--input", "corpus/notes.txt.gz"], "corpus/notes.txt.gz: only JSONL is read compressed"),
    (["--input", "corpus", "--scripts", "klingon"], "unknown script klingon"),
    (["--input", "corpus/one.txt", "--min_chars", "1000"], "the training split is empty after skipping, filtering"),
])
def test_bad_input_is_one_clear_error(tmp_path, args, message):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "corpus" / "empty.txt").write_text("")
    (tmp_path / "corpus" / "bad.jsonl").write_text('not json\n{"title": "no text"}\n')
    (tmp_path / "corpus" / "one.txt").write_text(CODE)
    (tmp_path / "corpus" / "notes.txt.gz").write_bytes(gzip.compress(b"notes"))
    pq.write_table(pa.table({"id": [1], "body": ["x"]}), tmp_path / "corpus" / "no_text.parquet")
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("module, file", [("pyarrow", "t.parquet"), ("zstandard", "t.jsonl.zst")])
def test_a_missing_optional_package_is_one_clear_error(tmp_path, module, file):
    write_formats(tmp_path / "corpus", ["some text", "more text"])
    shutil.copy(tmp_path / "corpus" / ("d.parquet" if module == "pyarrow" else "c.jsonl.zst"), tmp_path / file)
    script = f"import sys, prepare_data; sys.modules['{module}'] = None; prepare_data.main(sys.argv[1:])"
    result = run_cli("--input", file, cwd=tmp_path, script=script)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{file}: reading " in result.stderr
    assert f"needs the {module} package (pip install {module})" in result.stderr


def test_bad_lines_and_files_are_skipped_with_a_warning_naming_file_and_line(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "latin1.txt").write_bytes("line one\nline two\ncafé\n".encode("latin-1"))
    (corpus / "messy.jsonl").write_bytes("\n".join([
        '{"text": "fine"}', "not json", "[1, 2]", '{"title": "x"}', '{"text": 5}', '{"text": "\\ud800"}',
        "", '{"text": ""}', '{"text": "café"}']).encode("latin-1") + b"\n")
    records = {kind: [f"{kind} record {i}: " + words(np.random.default_rng(i), 30) for i in range(400)]
               for kind in ("gz", "zst")}
    for kind, compress in (("gz", gzip.compress), ("zst", zstandard.ZstdCompressor().compress)):
        data = compress("".join(json.dumps({"text": r}) + "\n" for r in records[kind]).encode())
        (corpus / f"truncated.jsonl.{kind}").write_bytes(data[:len(data) // 2])
    # Small shards: messy.jsonl is cut into pieces, and its line numbers must still count from its start.
    result = run_cli("--input", "corpus", "--vocab_size", "500", "--shard_mb", "0.00003", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings[:7] == [
        "warning: corpus/latin1.txt: not UTF-8 at line 3, file skipped",
        "warning: corpus/messy.jsonl:2: not valid JSON, line skipped",
        "warning: corpus/messy.jsonl:3: not a JSON object, line skipped",
        'warning: corpus/messy.jsonl:4: no string "text" field, line skipped',
        'warning: corpus/messy.jsonl:5: no string "text" field, line skipped',
        'warning: corpus/messy.jsonl:6: "text" holds an unpaired surrogate escape, line skipped',
        "warning: corpus/messy.jsonl:9: not UTF-8, line skipped",
    ]
    cuts = [re.fullmatch(rf"warning: corpus/truncated.jsonl.{kind}:(\d+): cannot decompress \(.+\): the file is "
                         r"cut short or corrupt; rest of file skipped", warning)
            for kind, warning in zip(("gz", "zst"), warnings[7:])]
    assert all(cuts) and len(warnings) == 9
    out = tmp_path / "data" / "corpus"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped"] == {"non-UTF-8 files": 1, "malformed JSONL lines": 6, "empty documents": 1,
                               "unreadable files": 2}
    kept = kept_documents(out)
    assert "fine" in kept
    for kind, cut in zip(("gz", "zst"), cuts):  # every line before the cut, none after
        assert set(records[kind]) & set(kept) == set(records[kind][:int(cut.group(1)) - 1])


def test_warnings_are_capped(tmp_path):
    (tmp_path / "c.jsonl").write_text("oops\n" * (MAX_WARNINGS + 10) + '{"text": "a"}\n{"text": "b"}\n')
    result = run_cli("--input", "c.jsonl", "--vocab_size", "300", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == MAX_WARNINGS + 1 and "10 more warnings not shown" in warnings[-1]


def test_failed_run_keeps_the_previous_output(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    main(["--input", str(corpus), "--out", str(out), "--vocab_size", "500"])
    before = snapshot(out)
    (tmp_path / "other.txt").write_text(CHINESE * 50)
    (tmp_path / "empty.txt").write_text("")
    # Fails early: nothing to tokenize.
    assert run_cli("--input", "empty.txt", "--out", "out", cwd=tmp_path).returncode == 1
    # Fails at the very end, after both .bin files were written: meta.json.tmp cannot be created.
    (out / "meta.json.tmp").mkdir()
    result = run_cli("--input", "other.txt", "corpus", "--out", "out", cwd=tmp_path)
    assert result.returncode != 0 and (out / "train.bin.tmp").stat().st_size > 0
    assert snapshot(out) == before
