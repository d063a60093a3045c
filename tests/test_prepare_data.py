"""prepare_data.py: the .bin files decode to the deduplicated documents; splits, workers, bad input."""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import prepare_data
from prepare_data import (MAX_WARNINGS, Skips, choose_validation, find_duplicates, main,
                          read_documents, resolve_inputs, scan_corpus, stdlib_sources)
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
    meta = json.loads((out / "meta.json").read_text())
    ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
    assert len(ids) == meta[f"{split}_tokens"] and ids[-1] == EOS_ID
    tok = Tokenizer(str(out / "tokenizer.model"))
    ends = np.flatnonzero(ids == EOS_ID)
    return [tok.decode(ids[start + 1:end]) for start, end in zip(np.r_[-1, ends[:-1]], ends)]


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "prepare_data.py"), *args], cwd=cwd,
                          capture_output=True, text=True)


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.suffix != ".tmp"}


def test_bins_decode_to_the_documents(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    main(["--input", str(corpus), "--out", str(out), "--vocab_size", "500", "--val_fraction", "0.2"])
    expected, duplicates = reference_documents(corpus)
    train, val = decode_documents(out, "train"), decode_documents(out, "val")
    assert sorted(train + val) == sorted(expected)
    assert train == [d for d in expected if d in train] and val == [d for d in expected if d in val]
    assert len(val) == round(0.2 * len(expected))
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["train_documents"], meta["val_documents"]) == (len(train), len(val))
    assert meta["duplicates_removed"] == duplicates == 3
    assert meta["bytes_read"] == sum(p.stat().st_size for p in corpus.iterdir() if p.suffix != ".md")
    assert meta["tokenizer_sha256"] == hashlib.sha256((out / "tokenizer.model").read_bytes()).hexdigest()
    assert meta["dtype"] == "uint16" and meta["skipped"] == {}
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.model", "train.bin", "val.bin"]


def test_split_is_seeded_and_by_document(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    runs = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        out = tmp_path / name
        if name != "a":  # same tokenizer, so only the split can differ
            out.mkdir()
            shutil.copy(tmp_path / "a" / "tokenizer.model", out)
        main(["--input", str(corpus), "--out", str(out), "--vocab_size", "500", "--val_fraction", "0.3",
              "--seed", seed])
        runs[name] = snapshot(out)
    assert runs["a"] == runs["b"]
    assert runs["a"]["val.bin"] != runs["c"]["val.bin"]
    expected, _ = reference_documents(corpus)
    assert set(decode_documents(tmp_path / "c", "val")) <= set(expected)  # whole documents only


def test_choose_validation_takes_at_least_one_and_never_all():
    assert choose_validation(2, 0.01, 0).sum() == 1
    assert choose_validation(3, 0.99, 0).sum() == 2
    assert choose_validation(1000, 0.01, 0).sum() == 10
    assert (choose_validation(1000, 0.01, 5) == choose_validation(1000, 0.01, 5)).all()


def test_output_is_identical_for_any_worker_count(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, "BATCH_BYTES", 64)  # many small batches, so the workers interleave
    corpus = write_corpus(tmp_path / "corpus")
    main(["--input", str(corpus), "--out", str(tmp_path / "one"), "--vocab_size", "500", "--workers", "1"])
    (tmp_path / "two").mkdir()
    shutil.copy(tmp_path / "one" / "tokenizer.model", tmp_path / "two")
    main(["--input", str(corpus), "--out", str(tmp_path / "two"), "--vocab_size", "500", "--workers", "2"])
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "two")


def test_dedup_keeps_first_copy_even_when_every_hash_collides(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.txt").write_text("two")
    (tmp_path / "c.txt").write_text("one")
    records = ["two", "three", "one", "three"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in records))
    paths = resolve_inputs([str(tmp_path)])

    def kept_texts():
        locations, _ = scan_corpus(paths, Skips())
        kept = locations[~find_duplicates(paths, locations)]
        return [d.decode() for d in read_documents(paths, kept)], locations["hash"]

    assert kept_texts()[0] == ["one", "two", "three"]
    monkeypatch.setattr(prepare_data, "document_hash", lambda data: 0)
    texts, hashes = kept_texts()
    assert (hashes == 0).all() and texts == ["one", "two", "three"]


def test_long_documents_become_chunks_at_line_boundaries(tmp_path):
    text = "".join(f"line {i} 中文\n" for i in range(300)) + "长" * 400
    (tmp_path / "big.txt").write_text(text)
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": text}) + "\n")
    paths = resolve_inputs([str(tmp_path)])
    locations, _ = scan_corpus(paths, Skips(), chunk_bytes=256)
    for index in range(2):
        chunks = list(read_documents(paths, locations[locations["file"] == index]))
        assert len(chunks) > 10 and b"".join(chunks) == text.encode()
        assert all(len(c) <= 256 for c in chunks)
        # A chunk ends mid-line only when it holds part of a line too long for any chunk.
        assert all(c.endswith(b"\n") or "\n" not in c.decode() for c in chunks)


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
    (["--input", "empty_folder"], "folder empty_folder holds no .txt or .jsonl files"),
    (["--input", "corpus/empty.txt", "corpus/bad.jsonl", "--out", "o"], "the corpus has no documents"),
    (["--input", "corpus/one.txt"], "the corpus is a single document"),
    (["--input", "corpus", "--vocab_size", "20"], "vocab_size must be between"),
    (["--input", "corpus", "--val_fraction", "1.5"], "--val_fraction must be between 0 and 1"),
    (["--input", "corpus/one.txt", "corpus/empty.txt"], "pass --out"),
])
def test_bad_input_is_one_clear_error(tmp_path, args, message):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "corpus" / "empty.txt").write_text("")
    (tmp_path / "corpus" / "bad.jsonl").write_text('not json\n{"title": "no text"}\n')
    (tmp_path / "corpus" / "one.txt").write_text(CODE)
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "o").exists()


def test_non_utf8_files_and_malformed_lines_are_skipped_with_a_warning(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "latin1.txt").write_bytes("line one\nline two\ncafé\n".encode("latin-1"))
    (corpus / "messy.jsonl").write_bytes("\n".join([
        '{"text": "fine"}', "not json", "[1, 2]", '{"title": "x"}', '{"text": 5}', '{"text": "\\ud800"}',
        "", '{"text": ""}', '{"text": "café"}']).encode("latin-1") + b"\n")
    result = run_cli("--input", "corpus", "--vocab_size", "500", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: corpus/latin1.txt: not UTF-8 at line 3, file skipped",
        "warning: corpus/messy.jsonl:2: not valid JSON, line skipped",
        "warning: corpus/messy.jsonl:3: not a JSON object, line skipped",
        'warning: corpus/messy.jsonl:4: no string "text" field, line skipped',
        'warning: corpus/messy.jsonl:5: no string "text" field, line skipped',
        'warning: corpus/messy.jsonl:6: "text" holds an unpaired surrogate escape, line skipped',
        "warning: corpus/messy.jsonl:9: not UTF-8, line skipped",
    ]
    out = tmp_path / "data" / "corpus"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped"] == {"non-UTF-8 files": 1, "malformed JSONL lines": 6, "empty documents": 1}
    assert "fine" in decode_documents(out, "train") + decode_documents(out, "val")


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
