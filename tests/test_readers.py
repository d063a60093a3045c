"""readers.py: each input format reads as the same documents and lines, whole or in pieces; long ones come in chunks."""
import gzip
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

import readers
from readers import Log, piece_documents, plan_shards, resolve_inputs, stdlib_sources

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
FORMAT_RECORDS = ["first 😀", None, CODE, "第二条记录", CHINESE * 2, "x" * 3000, "", "last\n"]  # None: no text


def write_formats(folder: Path, records: list) -> list[str]:
    """The same records (None: a missing text) as JSONL, gzip and zstd JSONL, and Parquet in row groups of 2."""
    folder.mkdir()
    lines = "".join(json.dumps({"content": r} if r is not None else {"other": 1}) + "\n" for r in records).encode()
    (folder / "a.jsonl").write_bytes(lines)
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(lines))
    (folder / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"id": range(len(records)), "content": records}), folder / "d.parquet", row_group_size=2)
    return resolve_inputs([str(folder)])


def read_corpus(paths: list[str], field: str = "text", shard_bytes: int = 1 << 20) -> list[tuple[str, int, str]]:
    """(file, line, text) of every document, read piece by piece as the workers read them; a piece's
    lines are numbered from its own start, so the lines of the file's earlier pieces are added."""
    shards, _ = plan_shards(paths, shard_bytes, field)
    found, lines_before = [], Counter()
    for file, start, end in (piece for pieces in shards for piece in pieces):
        log = Log()
        found += [(paths[file], lines_before[file] + line, data.decode())
                  for line, data in piece_documents(paths[file], start, end, field, log)]
        lines_before[file] += log.piece_lines[-1]
    return found


def test_each_input_format_reads_the_same_documents_whole_or_in_pieces(tmp_path):
    paths = write_formats(tmp_path / "corpus", FORMAT_RECORDS)
    assert [Path(p).name for p in paths] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet"]
    expected = [(line, text) for line, text in enumerate(FORMAT_RECORDS, 1) if text]
    for shard_bytes in (1 << 20, 100):  # whole files, and files cut into many pieces
        documents = read_corpus(paths, "content", shard_bytes)
        for path in paths:
            assert [(line, text) for p, line, text in documents if p == path] == expected


def test_long_documents_become_chunks_at_line_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "CHUNK_BYTES", 256)
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


def test_stdlib_sources_are_python_files_outside_site_packages():
    files = stdlib_sources()
    assert len(files) > 500 and all(f.endswith(".py") for f in files)
    assert not any("site-packages" in Path(f).parts for f in files)
    assert any(Path(f).parts[-2:] == ("json", "decoder.py") for f in files)
