"""Turn raw text into the token files train.py reads: train.bin, val.bin, meta.json, tokenizer.model.

Run:  python prepare_data.py                                 # Python's own standard library, offline
      python prepare_data.py --input pretrain_hq.jsonl       # one JSON object with "text" per line
      python prepare_data.py --input head.txt --val_input tail.txt --out data/book

The one idea: no step holds the corpus in memory. The first pass records only where each document
lies on disk (file, byte offset, length: 48 bytes with its hash); deduplication and the train/val
split work on those records; tokenizer processes re-read the documents by location, and the parent
appends their ids to the output as they arrive. A .bin file is a flat array of token ids (dtype in
meta.json), each document followed by </s>, meant for np.memmap. A finished output folder is only
ever replaced by another finished one.
"""
import argparse
import glob
import hashlib
import io
import json
import math
import os
import sys
import sysconfig
import time
from array import array
from collections import Counter
from itertools import chain
from multiprocessing import get_context
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tokenizer import (EOS_ID, MAX_TRAIN_BYTES, Tokenizer, check_vocab_size, line_chunks,
                       token_dtype, train_tokenizer)

# Documents longer than this are cut at line boundaries into chunks, each then a document of its own
# (own hash, own </s>). It bounds the memory and the size of a unit of work however long a file is;
# the cost is one artificial document boundary per ~300k tokens.
CHUNK_BYTES = 1 << 20
BATCH_BYTES = 1 << 20  # text per tokenizer task: large enough to amortise the inter-process hop
MAX_WARNINGS = 20
# One record per document: its text is file[offset:offset + length] for a text file, and the UTF-8
# of the "text" field of the JSON line at file[offset:offset + length] for .jsonl; either way cut to
# [start:end] when the document is a chunk of a longer one.
LOCATION = np.dtype([(name, np.uint64) for name in ("file", "offset", "length", "start", "end", "hash")])


def document_hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class Skips:
    """Counts what was skipped by reason; prints the first MAX_WARNINGS warnings, one line each."""

    def __init__(self):
        self.counts, self.warnings = Counter(), 0

    def add(self, reason: str, warning: str | None = None):
        self.counts[reason] += 1
        if warning:
            self.warnings += 1
            if self.warnings <= MAX_WARNINGS:
                tqdm.write(f"warning: {warning}", file=sys.stderr)  # on its own line, not after a bar

    def print_unshown(self):
        if self.warnings > MAX_WARNINGS:
            print(f"warning: {self.warnings - MAX_WARNINGS} more warnings not shown "
                  f"(skipped: {dict(self.counts)})", file=sys.stderr)


def fail(message: str):
    raise SystemExit(f"prepare_data.py: error: {message}")


def resolve_inputs(specs: list[str]) -> list[str]:
    """Files named by specs: a file as is, a folder's .txt and .jsonl files (recursively), a glob."""
    files = []
    for spec in specs:
        matches = [spec] if os.path.exists(spec) else sorted(glob.glob(spec, recursive=True))
        if not matches:
            fail(f"no file matches the pattern {spec}" if glob.has_magic(spec)
                 else f"no such file or folder: {spec}")
        for match in matches:
            if os.path.isdir(match):
                found = sorted(str(p) for p in Path(match).rglob("*")
                               if p.suffix in (".txt", ".jsonl") and p.is_file())
                if not found:
                    fail(f"folder {match} holds no .txt or .jsonl files")
                files += found
            else:
                files.append(match)
    return files


def stdlib_sources() -> list[str]:
    """The default corpus: every .py file of the running Python's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(str(p) for p in root.rglob("*.py")
                  if {"site-packages", "dist-packages"}.isdisjoint(p.relative_to(root).parts))


def jsonl_text(line: bytes) -> bytes:
    """UTF-8 of a JSONL line's "text" field; a ValueError says what is wrong with the line."""
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    except ValueError:
        raise ValueError("not valid JSON") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if not isinstance(record.get("text"), str):
        raise ValueError('no string "text" field')
    try:
        return record["text"].encode()
    except UnicodeEncodeError:
        raise ValueError('"text" holds an unpaired surrogate escape') from None


def text_file_documents(f, path: str, skips: Skips, chunk_bytes: int) -> list[tuple]:
    """(offset, length, start, end, hash) of the chunks of one text file; none if it is not UTF-8."""
    chunks, lines = [], 0
    for offset, data in line_chunks(f, chunk_bytes):
        try:
            data.decode()
        except UnicodeDecodeError as e:
            line = lines + data.count(b"\n", 0, e.start) + 1
            skips.add("non-UTF-8 files", f"{path}: not UTF-8 at line {line}, file skipped")
            return []
        lines += data.count(b"\n")
        chunks.append((offset, len(data), 0, len(data), document_hash(data)))
    if not chunks:
        skips.add("empty documents")
    return chunks


def jsonl_documents(f, path: str, skips: Skips, chunk_bytes: int):
    """(offset, length, start, end, hash) of each JSON line's text, or of its chunks if long."""
    offset = 0
    for lineno, line in enumerate(f, 1):
        line_offset, offset = offset, offset + len(line)
        if not line.strip():
            continue
        try:
            text = jsonl_text(line)
        except ValueError as e:
            skips.add("malformed JSONL lines", f"{path}:{lineno}: {e}, line skipped")
            continue
        if not text:
            skips.add("empty documents")
            continue
        for start, data in line_chunks(io.BytesIO(text), chunk_bytes):
            yield line_offset, len(line), start, start + len(data), document_hash(data)


def scan_corpus(paths: list[str], skips: Skips, chunk_bytes: int = CHUNK_BYTES) -> tuple[np.ndarray, int]:
    """Locate every document of the files, in order: (LOCATION records, bytes read)."""
    table = array("Q")  # LOCATION records back to back: compact, and grows without copying Python objects
    sizes = [os.path.getsize(path) for path in paths]
    with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="read and hash") as bar:
        for index, path in enumerate(paths):
            documents = jsonl_documents if path.endswith(".jsonl") else text_file_documents
            done = bar.n
            with open(path, "rb") as f:
                for record in documents(f, path, skips, chunk_bytes):
                    table.extend((index, *record))
                    bar.update(done + f.tell() - bar.n)
            bar.update(done + sizes[index] - bar.n)
    skips.print_unshown()
    return np.frombuffer(table, LOCATION), sum(sizes)


def read_documents(paths: list[str], locations: np.ndarray):
    """Yield the UTF-8 bytes of each located document, re-read from disk."""
    f, current = None, None
    for file, offset, length, start, end, _ in locations.tolist():
        if file != current:
            if f:
                f.close()
            f, current = open(paths[file], "rb"), file
        f.seek(offset)
        data = f.read(length)
        yield (jsonl_text(data) if paths[file].endswith(".jsonl") else data)[start:end]
    if f:
        f.close()


def find_duplicates(paths: list[str], locations: np.ndarray) -> np.ndarray:
    """True for each document whose exact text came earlier in the corpus.

    Equal hashes are only a hint: the texts are re-read and compared, so a hash collision can never
    drop a distinct document, and no text is kept in memory meanwhile.
    """
    order = np.argsort(locations["hash"], kind="stable")  # equal hashes side by side, in corpus order
    hashes = locations["hash"][order]
    starts = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]])
    ends = np.r_[starts[1:], len(hashes)]
    duplicate = np.zeros(len(locations), dtype=bool)
    for group in (order[s:e] for s, e in zip(starts, ends) if e - s > 1):
        distinct = []  # first occurrences among this group's texts
        for i, text in zip(group, read_documents(paths, locations[group])):
            if any(text == seen for seen in read_documents(paths, locations[distinct])):
                duplicate[i] = True
            else:
                distinct.append(i)
    return duplicate


def choose_validation(n_documents: int, val_fraction: float, seed: int) -> np.ndarray:
    """True for the documents (at least one, never all) that form the validation split."""
    n_val = min(max(1, round(n_documents * val_fraction)), n_documents - 1)
    is_val = np.zeros(n_documents, dtype=bool)
    is_val[np.random.default_rng(seed).choice(n_documents, n_val, replace=False)] = True
    return is_val


def batches(locations: np.ndarray) -> list[np.ndarray]:
    """Consecutive runs of documents holding about BATCH_BYTES of text each."""
    sizes = (locations["end"] - locations["start"]).astype(np.int64)
    first_byte = np.cumsum(sizes) - sizes
    return np.split(locations, np.flatnonzero(np.diff(first_byte // BATCH_BYTES)) + 1)


worker = {}  # per tokenizer process: the Tokenizer and the input paths, loaded once


def init_worker(model_path: str, paths: list[str]):
    worker.update(tokenizer=Tokenizer(model_path), paths=paths)


def tokenize_batch(locations: np.ndarray) -> np.ndarray:
    """Token ids of the documents, each followed by </s>, as one flat array."""
    texts = [data.decode() for data in read_documents(worker["paths"], locations)]
    ids = worker["tokenizer"].encode_batch(texts, num_threads=1)  # the pool is the parallelism
    return np.fromiter(chain.from_iterable(doc + [EOS_ID] for doc in ids),
                       dtype=token_dtype(worker["tokenizer"].vocab_size))


def write_tokens(pool: Pool, locations: np.ndarray, path: Path) -> int:
    """Tokenize the documents in order, appending each batch's ids to path as it arrives; return the count.

    imap keeps the order whatever the number of workers, so the file is the same byte for byte.
    """
    work = batches(locations)
    n_tokens = 0
    with open(path, "wb") as f, tqdm(total=int((locations["end"] - locations["start"]).sum()),
                                     unit="B", unit_scale=True, desc=f"tokenize {path.stem}") as bar:
        for batch, ids in zip(work, pool.imap(tokenize_batch, work)):
            f.write(ids.tobytes())
            n_tokens += len(ids)
            bar.update(int((batch["end"] - batch["start"]).sum()))
    return n_tokens


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Tokenize text into train.bin / val.bin for train.py.")
    parser.add_argument("--input", nargs="+", help="files, folders (their .txt and .jsonl files) or "
                        "glob patterns; .jsonl = one JSON object with a \"text\" field per line, any other "
                        "file = one document (default: the Python standard library's .py sources)")
    parser.add_argument("--val_input", nargs="+", help="inputs forming the validation split "
                        "(default: a random --val_fraction of the documents)")
    parser.add_argument("--out", help="output folder (default: data/<name of the single input>)")
    parser.add_argument("--vocab_size", type=int, default=6400)
    # 1% keeps 99% of the documents for training and still gives the default corpus 17 validation
    # files, ~60k tokens; small corpora want a larger fraction, or --val_input.
    parser.add_argument("--val_fraction", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        fail(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if args.workers < 1:
        fail(f"--workers must be at least 1, got {args.workers}")
    try:
        check_vocab_size(args.vocab_size)
    except ValueError as e:
        fail(str(e))
    return args


def default_out(inputs: list[str] | None) -> Path:
    if inputs is None:
        return Path("data/pystdlib")
    if len(inputs) == 1 and os.path.exists(inputs[0]):
        return Path("data") / Path(os.path.abspath(inputs[0])).stem
    fail("pass --out: no folder name follows from several inputs or a glob pattern")


def main(argv=None):
    args = parse_args(argv)
    train_files = resolve_inputs(args.input) if args.input else stdlib_sources()
    val_files = resolve_inputs(args.val_input) if args.val_input else []
    out = Path(args.out) if args.out else default_out(args.input)
    paths = train_files + val_files
    skips = Skips()
    locations, bytes_read = scan_corpus(paths, skips)
    if len(locations) == 0:
        fail("the corpus has no documents: every file or line is empty or was skipped")
    # Across both splits, training first: no validation document is also a training document.
    duplicate = find_duplicates(paths, locations)
    locations = locations[~duplicate]
    if val_files:
        is_val = locations["file"] >= len(train_files)
    elif len(locations) < 2:
        fail("the corpus is a single document, which cannot be split: add documents or pass --val_input")
    else:
        is_val = choose_validation(len(locations), args.val_fraction, args.seed)
    for split, chosen in (("training", ~is_val), ("validation", is_val)):
        if not chosen.any():
            fail(f"the {split} split is empty after skipping and deduplication")

    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "tokenizer.model"
    if model_path.exists():
        print(f"reusing {model_path}")
    else:
        train = locations[~is_val]
        # Every stride-th document, so the trainer's byte budget samples the whole corpus, not its start.
        stride = max(1, math.ceil(int((train["end"] - train["start"]).sum()) / MAX_TRAIN_BYTES))
        sample = train[::stride]
        print(f"training a {args.vocab_size}-token tokenizer on {len(sample):,} training documents")
        train_tokenizer((data.decode() for data in read_documents(paths, sample)), args.vocab_size, str(out))
    try:
        tokenizer = Tokenizer(str(model_path))
    except ValueError as e:
        fail(f"{e}; delete it to train a new one")

    tmp = {name: out / f"{name}.tmp" for name in ("train.bin", "val.bin", "meta.json")}
    started = time.time()
    # spawn: fresh workers that inherit no threads or locks from this process (fork would copy tqdm's
    # monitor thread, and in a test run torch's thread pools too).
    with get_context("spawn").Pool(args.workers, initializer=init_worker,
                                   initargs=(str(model_path), paths)) as pool:
        train_tokens = write_tokens(pool, locations[~is_val], tmp["train.bin"])
        val_tokens = write_tokens(pool, locations[is_val], tmp["val.bin"])
    seconds = time.time() - started
    text_bytes = int((locations["end"] - locations["start"]).sum())
    meta = {
        "vocab_size": tokenizer.vocab_size, "dtype": token_dtype(tokenizer.vocab_size).name,
        "eos_id": EOS_ID, "train_tokens": train_tokens, "val_tokens": val_tokens,
        "train_documents": int((~is_val).sum()), "val_documents": int(is_val.sum()),
        "duplicates_removed": int(duplicate.sum()), "bytes_read": bytes_read, "files": len(paths),
        "tokenizer_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
        "skipped": dict(skips.counts),
        "inputs": args.input or [sysconfig.get_paths()["stdlib"]], "val_inputs": args.val_input,
        "val_fraction": None if val_files else args.val_fraction, "seed": args.seed,
    }
    tmp["meta.json"].write_text(json.dumps(meta, indent=2) + "\n")
    # meta.json marks a complete folder: it goes first and comes back last, so no crash between the
    # replaces can leave a meta.json describing .bin files it does not match.
    (out / "meta.json").unlink(missing_ok=True)
    for name in ("train.bin", "val.bin", "meta.json"):
        os.replace(tmp[name], out / name)

    print(f"{out}: {train_tokens:,} train tokens ({meta['train_documents']:,} documents), "
          f"{val_tokens:,} val tokens ({meta['val_documents']:,} documents), {meta['dtype']}, "
          f"vocab {tokenizer.vocab_size}")
    print(f"read {bytes_read / 1e6:.1f} MB in {len(paths):,} files; removed {meta['duplicates_removed']:,} "
          f"duplicates; skipped {dict(skips.counts) or 'nothing'}")
    print(f"tokenized {text_bytes / 1e6:.1f} MB in {seconds:.1f} s ({text_bytes / 1e6 / seconds:.1f} MB/s "
          f"with --workers {args.workers}), {(train_tokens + val_tokens - len(locations)) / text_bytes:.3f} "
          f"tokens per byte not counting </s>")


if __name__ == "__main__":
    main()
