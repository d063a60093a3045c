"""Turn a raw corpus into the files train.py reads: train.bin, val.bin, their document indexes,
meta.json and tokenizer.model.

Run:  python prepare_data.py                                  # Python's own standard library, offline
      python prepare_data.py --input pretrain_hq.jsonl        # one JSON object with "text" per line
      python prepare_data.py --input 'fineweb/*.parquet' --out data/fineweb --resume

The one idea: the corpus is cut into shards of a few MB that worker processes read on their own, in
two passes. The first turns every document into a few numbers: a hash of its text (exact
duplicates), a MinHash signature (near-duplicates) and the quality filters' verdict. From those
numbers (and a second look at the texts whose hashes repeat) the parent decides which documents
stay and which go to validation; the second pass re-reads each shard and tokenizes what stays.
Each pass writes one file per shard into out/work/, renamed into place when complete, so memory
does not grow with the corpus (only the dedup index does), the output does not depend on the
number of workers or on which shard finishes first, and --resume skips the shards a killed run
had finished. A .bin file is a flat array of token ids (dtype in meta.json), each document
followed by </s>, meant for np.memmap; <split>_doc_index.npy holds the offset where each of its
documents starts. A finished output folder is only replaced by another.

Its parts: readers.py turns every input format into a stream of documents, dedup.py finds the exact
and near-duplicates among them (MinHash, LSH, union-find), and this file holds the quality filters,
the workers' two passes, the choice of what stays, and the command.
"""
import argparse
import hashlib
import json
import math
import os
import pickle
import shutil
import sys
import sysconfig
import time
import unicodedata
from collections import Counter
from contextlib import ExitStack
from functools import cache
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dedup import (band_keys, estimated_jaccard, exact_duplicates, lsh_bands, minhash, near_duplicate_roots,
                   unit_hashes)
from files import atomic_write, lock_folder
from readers import (MAX_WARNINGS, Log, fail, input_format, piece_documents, plan_shards, resolve_inputs,
                     stdlib_sources)
from tokenizer import EOS_ID, MAX_TRAIN_BYTES, Tokenizer, check_vocab_size, token_dtype, train_tokenizer

# Text per MinHash or tokenizer call inside a worker: MinHash's temporaries (~50 bytes per character)
# then stay in the CPU caches, which makes it several times faster than on one big batch.
BATCH_BYTES = 1 << 18
REPORT_PAIRS = 100  # removed/kept pairs that --dedup_report shows
VOCAB_SIZE = 6400  # the tokenizer trained when no --vocab_size is given (minimind's)
# out/work, the scratch folder of a run, holds this file from its creation: a work folder without it is not
# prepare_data.py's, and is never emptied or removed.
SCRATCH_MARK = "made-by-prepare_data.py"
FILTERS = ("min_chars", "max_symbol_fraction", "scripts", "max_repeated_lines")


# ---- the quality filters: the first pass's verdict on each document ------------------------------

@cache
def char_classes() -> tuple[np.ndarray, np.ndarray, dict]:
    """Per code point: 1 for a symbol, and a letter's script id (0: not a letter); the script ids.

    Symbols are Unicode's categories S and C: math, currency, emoji, box drawing, control and
    unassigned code points (tab and newline excepted). Python has no script property, so a letter's
    script is the first word of its Unicode name: latin, cjk, cyrillic, arabic, hangul, hiragana...
    """
    symbol, script, names = np.zeros(0x110000, np.uint8), np.zeros(0x110000, np.uint16), {}
    for c in range(0x110000):
        category = unicodedata.category(chr(c))
        if category[0] in "SC" and chr(c) not in "\t\n\r":
            symbol[c] = 1
        elif category[0] == "L":
            script[c] = names.setdefault(unicodedata.name(chr(c), "unnamed").split()[0].lower(), len(names) + 1)
    return symbol, script, names


def repeated_line_fraction(text: str) -> float:
    """Share of the non-blank lines that repeat an earlier line: menus, boilerplate, spam (Gopher's
    duplicate-line filter, Rae et al. 2021)."""
    lines = [line for line in map(str.strip, text.split("\n")) if line]
    return 1 - len(set(lines)) / len(lines) if lines else 0.0


def quality_verdicts(texts: list[str], args) -> np.ndarray:
    """Per text: 0 if it passes every quality filter that is on, else 1 + the first it fails."""
    failed = np.zeros((len(FILTERS), len(texts)), bool)
    lengths = np.fromiter(map(len, texts), np.int64, len(texts))
    failed[0] = lengths < args.min_chars
    if args.max_symbol_fraction < 1 or args.scripts:
        chars = np.frombuffer("".join(texts).encode("utf-32-le"), np.uint32)
        starts = np.cumsum(lengths) - lengths  # texts are never empty, so reduceat sums each one
        symbol, script, names = char_classes()
        symbols = np.add.reduceat(symbol[chars], starts, dtype=np.int64)
        failed[1] = symbols > args.max_symbol_fraction * lengths
        if args.scripts:
            scripts = script[chars]
            letters = np.add.reduceat(scripts > 0, starts, dtype=np.int64)
            wanted = np.add.reduceat(np.isin(scripts, [names[s] for s in args.scripts]), starts, dtype=np.int64)
            failed[2] = wanted < args.min_script_fraction * letters  # text without letters passes
    if args.max_repeated_lines < 1:
        failed[3] = [repeated_line_fraction(t) > args.max_repeated_lines for t in texts]
    return np.where(failed.any(0), failed.argmax(0) + 1, 0).astype(np.uint8)


# ---- the workers' tasks: one shard each -----------------------------------------------------------

worker = {}  # per process: the paths, the shard plan, the arguments; the tokenizer once loaded


def init_worker(job_path: str):
    with open(job_path, "rb") as f:
        worker.update(pickle.load(f))


def shard_documents(k: int, log: Log):
    """(piece, line, UTF-8 text) of every document of shard k, in corpus order."""
    for piece, (file, start, end) in enumerate(worker["shards"][k]):
        field = None if worker["args"].chat else worker["args"].text_field
        for line, data in piece_documents(worker["paths"][file], start, end, field, log):
            yield piece, line, data


def batched(items, limit: int = BATCH_BYTES):
    """Lists of consecutive items whose last elements (texts) add up to about limit bytes."""
    batch, size = [], 0
    for item in items:
        batch.append(item)
        size += len(item[-1])
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def save_npz(path: Path, **arrays):
    """A shard's .npz, written last: its presence marks the shard finished (see finished)."""
    with atomic_write(path, sync=False) as f:
        np.savez(f, **arrays)


def document_text(data: bytes, chat: bool) -> str:
    """What the filters and MinHash read of a document: a conversation's messages, without the JSON around
    them (whose keys, the same in every line, would make short conversations look alike)."""
    if not chat:
        return data.decode()
    return "\n".join(message["content"] for message in json.loads(data))


def scan_shard(job: tuple) -> int:
    """First pass over shard k: each document's exact hash, byte length, quality verdict and LSH
    band keys into scan/k.npz, its MinHash signature into scan/k.sig. Returns k."""
    k, = job
    args, folder, log = worker["args"], Path(worker["work"]) / "scan", Log()
    bands = lsh_bands(args.dedup_threshold, args.num_perm) if args.near_dedup else (0, 0)
    parts = {"hash": [np.zeros((0, 2), np.uint64)], "length": [np.zeros(0, np.uint32)],
             "verdict": [np.zeros(0, np.uint8)], "bands": [np.zeros((0, bands[0]), np.uint32)]}
    piece_docs = Counter()
    with atomic_write(folder / f"{k:06d}.sig", sync=False) as sig_file:
        for batch in batched(shard_documents(k, log)):
            piece_docs.update(piece for piece, _, _ in batch)
            data = [d for _, _, d in batch]
            texts = [document_text(d, args.chat) for d in data]
            digests = b"".join(hashlib.blake2b(d, digest_size=16).digest() for d in data)
            parts["hash"].append(np.frombuffer(digests, np.uint64).reshape(-1, 2))
            parts["length"].append(np.fromiter(map(len, data), np.uint32, len(data)))
            parts["verdict"].append(quality_verdicts(texts, args))
            if args.near_dedup:
                signature = minhash(*unit_hashes(texts, args.shingle), args.ngram, args.num_perm)
                sig_file.write(signature.tobytes())
                parts["bands"].append(band_keys(signature, *bands))
            else:
                parts["bands"].append(np.zeros((len(data), 0), np.uint32))
    log_json = {"counts": log.counts, "warnings": log.warnings, "n_warnings": log.n_warnings,
                "piece_lines": log.piece_lines, "piece_docs": [piece_docs[p] for p in range(len(log.piece_lines))]}
    save_npz(folder / f"{k:06d}.npz", log=np.array(json.dumps(log_json)),
             **{name: np.concatenate(arrays) for name, arrays in parts.items()})
    return k


def read_shard_documents(job: tuple) -> list[tuple]:
    """(index in shard, piece, line, text) of the wanted documents of shard k."""
    k, wanted = job
    wanted = set(wanted.tolist())
    return [(i, piece, line, data) for i, (piece, line, data) in enumerate(shard_documents(k, Log()))
            if i in wanted]


def tokenize_shard(job: tuple) -> int:
    """Second pass over shard k: tokenize the documents its split array marks 0 (train) or 1 (val),
    each followed by </s>, into k.train / k.val; their token counts into k.npz. Returns k."""
    k, split, folder, model_path = job
    if worker.get("model_path") != model_path:
        worker.update(model_path=model_path, tokenizer=Tokenizer(model_path))
    tokenizer = worker["tokenizer"]
    dtype = token_dtype(tokenizer.vocab_size)
    counts, chat = ([], []), worker["args"].chat
    with ExitStack() as stack:
        def shard_file(suffix):  # this shard's part of train.bin and val.bin (or of their masks)
            return [stack.enter_context(atomic_write(folder / f"{k:06d}.{split}{suffix}", sync=False))
                    for split in ("train", "val")]
        tokens, masks = shard_file(""), shard_file("_mask") if chat else None
        documents = ((split[i], data) for i, (_, _, data) in enumerate(shard_documents(k, Log())) if split[i] >= 0)
        for batch in batched(documents):
            if chat:  # ChatML with the loss mask of the replies; the </s> after each conversation is not a target
                rendered = [tokenizer.render_chat(json.loads(data)) for _, data in batch]
            else:  # one thread each: the pool is the parallelism
                rendered = [(ids, None) for ids in tokenizer.encode_batch([d.decode() for _, d in batch], num_threads=1)]
            for which in (0, 1):
                flat, flat_mask = [], []
                for (s, _), (doc, mask) in zip(batch, rendered):
                    if s == which:
                        flat += [*doc, EOS_ID]
                        flat_mask += [*(mask or []), 0]
                        counts[which].append(len(doc) + 1)
                tokens[which].write(np.array(flat, dtype).tobytes())
                if chat:
                    masks[which].write(np.array(flat_mask, np.uint8).tobytes())
    save_npz(folder / f"{k:06d}.npz", train=np.array(counts[0], np.int64), val=np.array(counts[1], np.int64))
    return k


def run_shards(pool, task, jobs: list[tuple], sizes: list[int], desc: str):
    """Run task on each job (shard index first), biggest shards first: the pass then ends on a small
    shard rather than on one core finishing a big one alone. Any order gives the same files."""
    jobs = sorted(jobs, key=lambda job: -sizes[job[0]])
    with tqdm(total=sum(sizes[job[0]] for job in jobs), unit="B", unit_scale=True, desc=desc) as bar:
        for k in pool.imap_unordered(task, jobs):
            bar.update(sizes[k])


def finished(folder: Path, n_shards: int) -> set[int]:
    """Shards whose .npz (written last, renamed into place) is in folder."""
    return {int(p.stem) for p in folder.glob("*.npz") if p.stem.isdigit() and int(p.stem) < n_shards}


# ---- deciding what stays: in the parent, from the first pass's numbers ----------------------------

def read_signatures(folder: Path, first_doc: np.ndarray, num_perm: int, docs: np.ndarray) -> np.ndarray:
    """MinHash rows of the documents docs (global indices, any order), from the shards' .sig files."""
    rows = np.empty((len(docs), num_perm), np.uint32)
    order = np.argsort(docs, kind="stable")
    bounds = np.searchsorted(docs[order], first_doc)  # docs of shard k: order[bounds[k]:bounds[k + 1]]
    for k in np.flatnonzero(np.diff(bounds)):
        chosen = order[bounds[k]:bounds[k + 1]]
        signatures = np.memmap(folder / f"{k:06d}.sig", np.uint32, "r").reshape(-1, num_perm)
        rows[chosen] = signatures[docs[chosen] - first_doc[k]]
    return rows



def read_documents(pool, docs: np.ndarray, first_doc: np.ndarray):
    """(shard, document, piece, line, text) of the documents docs (sorted global indices), in order,
    re-read by the workers."""
    bounds = np.searchsorted(docs, first_doc)
    jobs = [(k, docs[bounds[k]:bounds[k + 1]] - first_doc[k]) for k in np.flatnonzero(np.diff(bounds))]
    for (k, _), found in zip(jobs, pool.imap(read_shard_documents, jobs)):
        for i, piece, line, data in found:
            yield k, first_doc[k] + i, piece, line, data


def choose_validation(n_documents: int, val_fraction: float, seed: int) -> np.ndarray:
    """True for the documents (at least one, never all) that form the validation split."""
    n_val = min(max(1, round(n_documents * val_fraction)), n_documents - 1)
    is_val = np.zeros(n_documents, dtype=bool)
    is_val[np.random.default_rng(seed).choice(n_documents, n_val, replace=False)] = True
    return is_val


# ---- the run --------------------------------------------------------------------------------------

def load_index(folder: Path, n_shards: int) -> tuple[dict, np.ndarray, list[dict]]:
    """The first pass's per-document arrays of all shards in corpus order, the global index of each
    shard's first document, and each shard's log.

    This is the dedup index, the one part of the run that grows with the corpus: per document a
    16-byte hash, 4 bytes per LSH band (72 at the defaults), a 4-byte length and a 1-byte verdict,
    93 bytes; deduplication needs ~90 more while it runs (measured on a million documents). The
    MinHash signatures themselves (4 bytes per bin) stay on disk until a candidate pair needs them.
    """
    logs = []
    for k in range(n_shards):
        with np.load(folder / f"{k:06d}.npz") as scan:
            logs.append(json.loads(str(scan["log"])))
    first_doc = np.cumsum([0] + [sum(log["piece_docs"]) for log in logs])
    index = {}
    for k in range(n_shards):
        with np.load(folder / f"{k:06d}.npz") as scan:
            for name in ("hash", "length", "verdict", "bands"):
                if name not in index:  # allocated whole, then filled: the index is never held twice
                    index[name] = np.empty((first_doc[-1], *scan[name].shape[1:]), scan[name].dtype)
                index[name][first_doc[k]:first_doc[k + 1]] = scan[name]
    return index, first_doc, logs


def choose_documents(index: dict, args, val_input: np.ndarray | None, read_texts, signature_rows) -> tuple:
    """Which documents stay and where: per document -1 (removed), 0 (train) or 1 (validation); the
    counts of what was removed; the removed near-duplicates beside the documents kept in their place.

    Filters, then exact duplicates, then near-duplicates, across both splits and training first: no
    validation document is also, or nearly, a training document. val_input: per document, whether
    it comes from --val_input (None: draw the validation split at random).
    """
    n, lengths = len(index["length"]), index["length"]
    passes = index["verdict"] == 0
    exact = exact_duplicates(index["hash"], lengths, passes, read_texts)
    roots = np.arange(n)
    if args.near_dedup:
        rows = lsh_bands(args.dedup_threshold, args.num_perm)[1]
        roots = near_duplicate_roots(index["bands"], rows, passes & ~exact, signature_rows, args.dedup_threshold)
    near = np.flatnonzero(roots != np.arange(n))
    docs = np.flatnonzero(passes & ~exact & (roots == np.arange(n)))
    if val_input is not None:
        is_val = val_input[docs]
    elif len(docs) == 1:
        fail("the corpus is a single document, which cannot be split: add documents or pass --val_input")
    else:
        is_val = choose_validation(len(docs), args.val_fraction, args.seed) if len(docs) else np.zeros(0, bool)
    for split, chosen in (("training", ~is_val), ("validation", is_val)):
        if not chosen.any():
            fail(f"the {split} split is empty after skipping, filtering and deduplication")
    split = np.full(n, -1, np.int8)
    split[docs] = is_val
    filters_on = [args.min_chars > 0, args.max_symbol_fraction < 1, bool(args.scripts), args.max_repeated_lines < 1]
    removed = {
        "duplicates_removed": int(exact.sum()), "duplicate_bytes_removed": int(lengths[exact].sum(dtype=np.int64)),
        "near_duplicates_removed": len(near), "near_duplicate_clusters": len(np.unique(roots[near])),
        "near_duplicate_bytes_removed": int(lengths[near].sum(dtype=np.int64)),
        "filtered": {name: int((index["verdict"] == i + 1).sum())
                     for i, (name, on) in enumerate(zip(FILTERS, filters_on)) if on},
        "train_bytes": int(lengths[split == 0].sum(dtype=np.int64)),
        "kept_bytes": int(lengths[docs].sum(dtype=np.int64)),
    }
    return split, removed, (near, roots[near])


def line_offsets(shards: list[list[tuple]], logs: list[dict]) -> list[list[int]]:
    """For each piece of each shard, the lines (Parquet: rows) of its file that come before it."""
    seen, offsets = Counter(), []
    for pieces, log in zip(shards, logs):
        offsets.append([])
        for (file, _, _), lines in zip(pieces, log["piece_lines"]):
            offsets[-1].append(seen[file])
            seen[file] += lines
    return offsets


def print_warnings(where, logs: list[dict]) -> Counter:
    """Print the first MAX_WARNINGS warnings in corpus order; return the skip counts of all shards."""
    skipped, shown, total = Counter(), 0, 0
    for k, log in enumerate(logs):
        skipped.update(log["counts"])
        total += log["n_warnings"]
        for piece, line, message in log["warnings"][:MAX_WARNINGS - shown]:
            print(f"warning: {where(k, piece, line)}: {message}", file=sys.stderr)
            shown += 1
    if total > shown:
        print(f"warning: {total - shown} more warnings not shown (skipped: {dict(skipped)})", file=sys.stderr)
    return skipped


def assemble(folder: Path, n_shards: int, files: dict) -> dict[str, int]:
    """Concatenate the shards' tokens into files["<split>.bin"] in corpus order (and their loss masks into
    files["<split>_mask.bin"] if there is one), and write each document's start offset into
    files["<split>_doc_index.npy"]; return the tokens per split."""
    tokens = {}
    for split in ("train", "val"):
        starts, total = [], 0
        for k in range(n_shards):
            with open(folder / f"{k:06d}.{split}", "rb") as part:
                shutil.copyfileobj(part, files[f"{split}.bin"], 1 << 24)
            if f"{split}_mask.bin" in files:
                with open(folder / f"{k:06d}.{split}_mask", "rb") as part:
                    shutil.copyfileobj(part, files[f"{split}_mask.bin"], 1 << 24)
            with np.load(folder / f"{k:06d}.npz") as shard:
                counts = shard[split]
            starts.append(total + np.cumsum(counts) - counts)
            total += int(counts.sum())
        np.save(files[f"{split}_doc_index.npy"], np.concatenate(starts))
        tokens[split] = total
    return tokens


def write_report(path: str, pool, near_pairs: tuple, first_doc: np.ndarray, signature_rows, where, seed: int):
    """JSONL of up to REPORT_PAIRS removed near-duplicates beside the document kept in their place,
    least similar first: the pairs that tell whether the threshold is right."""
    removed, kept = near_pairs
    if len(removed) > REPORT_PAIRS:
        chosen = np.sort(np.random.default_rng(seed).choice(len(removed), REPORT_PAIRS, replace=False))
        removed, kept = removed[chosen], kept[chosen]
    found = {doc: (where(k, piece, line), data.decode())
             for k, doc, piece, line, data in read_documents(pool, np.unique(np.r_[removed, kept]), first_doc)}
    jaccard = estimated_jaccard(signature_rows(removed), signature_rows(kept)) if len(removed) else []
    pairs = sorted(zip(jaccard, removed.tolist(), kept.tolist()))
    with atomic_write(path, "w") as f:
        for j, r, c in pairs:
            f.write(json.dumps({"jaccard": round(float(j), 3), "removed": found[r][0], "kept": found[c][0],
                                "removed_text": found[r][1], "kept_text": found[c][1]}, ensure_ascii=False) + "\n")


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Filter, deduplicate and tokenize a corpus into train.bin / "
                                     "val.bin for train.py.")
    parser.add_argument("--input", nargs="+", help="files, folders (their .txt, .jsonl, .jsonl.gz, .jsonl.zst and "
                        ".parquet files) or glob patterns; a .jsonl line and a Parquet row hold a document in "
                        "--text_field, any other file is one document (default: the Python standard library's "
                        ".py sources)")
    parser.add_argument("--val_input", nargs="+", help="inputs forming the validation split "
                        "(default: a random --val_fraction of the documents)")
    parser.add_argument("--out", help="output folder (default: data/<name of the single input>)")
    parser.add_argument("--text_field", default="text", help="the JSONL field / Parquet column of the text")
    parser.add_argument("--chat", action="store_true", help="the inputs are JSONL conversations, one a line "
                        '({"messages": [...]} or {"conversations": [...]}): tokenized as ChatML, with a loss mask '
                        "beside each .bin (<split>_mask.bin: 1 on the assistant replies); usually with --tokenizer")
    parser.add_argument("--vocab_size", type=int, help=f"size of the tokenizer to train (default {VOCAB_SIZE})")
    parser.add_argument("--tokenizer", help="tokenize with this tokenizer.model instead of training one (the one a "
                        "model was trained with, say); it is copied into the output folder")
    # 1% keeps 99% of the documents for training and still gives the default corpus 17 validation
    # files, ~60k tokens; small corpora want a larger fraction, or --val_input.
    parser.add_argument("--val_fraction", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--shard_mb", type=float, help="input per shard, the unit of work and of --resume "
                        "(default: a 256th of the input, within 1 to 64 MB)")
    parser.add_argument("--resume", action="store_true", help="continue a killed run with the same "
                        "arguments: the shards it finished are not read again")
    near = parser.add_argument_group("near-duplicates (after exact duplicates, which are always removed)")
    near.add_argument("--no_near_dedup", dest="near_dedup", action="store_false")
    near.add_argument("--dedup_threshold", type=fraction, default=0.8, help="Jaccard similarity of two "
                      "documents' shingle sets from which one is removed (default 0.8)")
    near.add_argument("--shingle", choices=("char", "word"), default="char", help="shingle unit: characters "
                      "(any script, code) or words (space-separated languages only); default char")
    near.add_argument("--ngram", type=int, default=5, help="units per shingle (default 5)")
    near.add_argument("--num_perm", type=int, default=128, help="MinHash bins per document (default 128)")
    near.add_argument("--dedup_report", metavar="FILE", help=f"write {REPORT_PAIRS} removed/kept pairs to FILE (JSONL)")
    quality = parser.add_argument_group("quality filters (all off by default)")
    quality.add_argument("--min_chars", type=int, default=0, help="drop documents shorter than this")
    quality.add_argument("--max_symbol_fraction", type=fraction, default=1.0, help="drop documents with a "
                         "larger share of symbol characters (Unicode S* and C*: emoji, box drawing, control); "
                         "code has ~0.05, try 0.2")
    quality.add_argument("--scripts", nargs="+", help="keep documents whose letters are mostly of these "
                         "scripts, e.g. cjk latin (Chinese and code)")
    quality.add_argument("--min_script_fraction", type=fraction, default=0.8,
                         help="share of letters that --scripts needs (default 0.8)")
    quality.add_argument("--max_repeated_lines", type=fraction, default=1.0, help="drop documents with a larger "
                         "share of non-blank lines that repeat an earlier one; Gopher uses 0.3")
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        fail(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    for name in ("workers", "ngram", "num_perm"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(args, name)}")
    if (args.shard_mb is not None and args.shard_mb <= 0) or args.dedup_threshold == 0:
        fail("--shard_mb and --dedup_threshold must be above 0")
    if args.scripts:
        args.scripts = [s.lower() for s in args.scripts]
        unknown = sorted(set(args.scripts) - set(char_classes()[2]))
        if unknown:
            fail(f"unknown script {unknown[0]}: use the first word of its letters' Unicode names, "
                 "e.g. latin, cjk, cyrillic, greek, arabic, hangul, hiragana, katakana, devanagari")
    if args.tokenizer:
        if not os.path.isfile(args.tokenizer):
            fail(f"--tokenizer {args.tokenizer}: no such file")
        try:
            vocab_size = Tokenizer(args.tokenizer).vocab_size
        except ValueError as e:
            fail(f"--tokenizer: {e}")
        if args.vocab_size not in (None, vocab_size):
            fail(f"--vocab_size {args.vocab_size} but --tokenizer {args.tokenizer} has {vocab_size} tokens")
    try:
        check_vocab_size(args.vocab_size or VOCAB_SIZE)
    except ValueError as e:
        fail(str(e))
    return args


def default_out(inputs: list[str] | None) -> Path:
    if inputs is None:
        return Path("data/pystdlib")
    if len(inputs) == 1 and os.path.exists(inputs[0]):
        return Path("data") / Path(os.path.abspath(inputs[0]).removesuffix(".gz").removesuffix(".zst")).stem
    fail("pass --out: no folder name follows from several inputs or a glob pattern")


def main(argv=None):
    args = parse_args(argv)
    train_files = resolve_inputs(args.input) if args.input else stdlib_sources()
    val_files = resolve_inputs(args.val_input) if args.val_input else []
    out = Path(args.out) if args.out else default_out(args.input)
    paths = train_files + val_files
    if args.chat and not args.input:
        fail("--chat needs --input: conversation files (.jsonl, .jsonl.gz, .jsonl.zst)")
    for path in paths if args.chat else []:
        if input_format(path) != "jsonl":
            fail(f"--chat reads conversations from JSONL files, one a line; {path} is not one")
    # ~256 shards keep every core busy to the last one and cost ~1 ms each; 1 to 64 MB bounds the files
    # in out/work/ and the memory of a worker.
    total = sum(map(os.path.getsize, paths))
    shard_bytes = round(args.shard_mb * 1e6) if args.shard_mb else int(np.clip(total / 256, 1e6, 64e6))
    shards, sizes = plan_shards(paths, max(1, shard_bytes), args.text_field)
    if not shards:
        fail("the corpus has no documents: every Parquet file is empty")
    # Everything the work folder's files depend on: a resumed run must agree on all of it.
    settings = {"inputs": [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths],
                "args": {k: v for k, v in vars(args).items() if k not in ("workers", "resume", "dedup_report")},
                "tokenizer_sha256": sha256_of(args.tokenizer) if args.tokenizer else None}
    settings = json.loads(json.dumps(settings))
    work = out / "work"
    check_out_folder(out, work, paths, settings["tokenizer_sha256"])
    resuming = args.resume and (work / "settings.json").exists()
    if resuming and json.loads((work / "settings.json").read_text()) != settings:
        fail(f"--resume: {work} was left by a run with other inputs or arguments; run without --resume")
    if args.resume and not resuming:
        print(f"--resume: no unfinished run in {work}, starting from the beginning")
    created = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)  # the top new folder
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create --out {out}: {e.strerror}")
    # Before anything is removed: a second run into the same folder stops here, leaving the first run's work alone.
    lock = lock_folder(str(out), "prepare_data.py run")
    try:
        if not resuming:
            shutil.rmtree(work, ignore_errors=True)  # ours: check_out_folder found our mark, or nothing
            (work / "scan").mkdir(parents=True)
            (work / SCRATCH_MARK).touch()
            with atomic_write(work / "settings.json", "w", sync=False) as f:  # a torn one would break --resume
                f.write(json.dumps(settings))
        prepare(args, paths, len(train_files), shards, sizes, out, work)
        shutil.rmtree(work)
    except OSError as e:  # a read-only or full disk
        shutil.rmtree(created or work, ignore_errors=True)
        fail(f"cannot write {e.filename or out}: {e.strerror}")
    except SystemExit:  # a clear error about the input: leave nothing of this run behind
        shutil.rmtree(created or work, ignore_errors=True)
        raise
    finally:
        os.close(lock)


def sha256_of(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_out_folder(out: Path, work: Path, paths: list[str], tokenizer_sha256: str | None) -> None:
    """Refuse, before any work, an output folder whose files this run would overwrite or delete without having
    made them: a --out that is a file, a work/ folder that is not prepare_data.py's scratch folder (or holds an
    input), and a tokenizer.model that no finished run recorded in its meta.json (unless it is --tokenizer's)."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} exists and is not a folder")
    if work.exists() and not (work / SCRATCH_MARK).exists():
        fail(f"{work} exists and was not made by prepare_data.py (it has no {SCRATCH_MARK}), so it is left as it "
             "is: move it away or choose another --out")
    for path in paths:
        if Path(path).resolve().is_relative_to(work.resolve()):
            fail(f"the input {path} lies in {work}, the scratch folder this run empties: move it or choose another --out")
    model_path = out / "tokenizer.model"
    if model_path.exists():
        try:
            recorded = json.loads((out / "meta.json").read_text())["tokenizer_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            recorded = None
        if sha256_of(model_path) not in (recorded, tokenizer_sha256):
            fail(f"{model_path} was not written by a finished prepare_data.py run (no meta.json beside it records "
                 "it), so it is not replaced: pass --tokenizer to tokenize with it, or move it away")


def choose_tokenizer(args, pool, split: np.ndarray, train_bytes: int, first_doc: np.ndarray, work: Path) -> Path:
    """The tokenizer to tokenize with: --tokenizer if given; when resuming, the one this run already trained into
    work/; else a new one trained on the training documents. It reaches out/ only with the other outputs."""
    if args.tokenizer:
        print(f"tokenizing with {args.tokenizer} (--tokenizer)")
        return Path(args.tokenizer)
    model_path = work / "tokenizer.model"
    if model_path.exists():  # work/ is this run's (its settings matched): the tokenizer belongs to this corpus
        print(f"resuming: reusing the tokenizer this run trained ({model_path})")
        return model_path
    train = np.flatnonzero(split == 0)
    # Every stride-th document, so the trainer's byte budget samples the whole corpus, not its start.
    sample = train[::max(1, math.ceil(train_bytes / MAX_TRAIN_BYTES))]
    vocab_size = args.vocab_size or VOCAB_SIZE
    print(f"training a {vocab_size}-token tokenizer on {len(sample):,} training documents")
    try:
        return Path(train_tokenizer((data.decode() for *_, data in read_documents(pool, sample, first_doc)),
                                    vocab_size, str(work)))
    except ValueError as e:
        fail(str(e))


def prepare(args, paths: list[str], n_train_files: int, shards: list[list[tuple]], sizes: list[int],
            out: Path, work: Path):
    started = time.time()
    # The workers read the shard plan from a file: passed as an argument, its ~100 KB would fill the pipe
    # to each new worker, and the pool would wait for one worker's start-up before launching the next.
    with open(work / "job.pkl", "wb") as f:
        pickle.dump({"paths": paths, "shards": shards, "args": args, "work": str(work)}, f)
    # spawn: fresh workers that inherit no threads or locks from this process (fork would copy tqdm's
    # monitor thread, and in a test run torch's thread pools too).
    with get_context("spawn").Pool(args.workers, init_worker, (str(work / "job.pkl"),)) as pool:
        done = finished(work / "scan", len(shards))
        if done:
            print(f"resuming: {len(done)} of {len(shards)} shards already scanned")
        run_shards(pool, scan_shard, [(k,) for k in range(len(shards)) if k not in done], sizes, "scan")
        index, first_doc, logs = load_index(work / "scan", len(shards))
        offsets = line_offsets(shards, logs)

        def where(k, piece, line):
            path = paths[shards[k][piece][0]]
            return path if line is None else f"{path}:{offsets[k][piece] + line}"

        skipped = print_warnings(where, logs)
        if first_doc[-1] == 0:
            fail("the corpus has no documents: every file or line is empty or was skipped")
        val_input = None
        if n_train_files < len(paths):
            piece_files = [file for pieces in shards for file, _, _ in pieces]
            val_input = np.repeat(piece_files, [n for log in logs for n in log["piece_docs"]]) >= n_train_files
        signature_rows = lambda docs: read_signatures(work / "scan", first_doc, args.num_perm, docs)  # noqa: E731
        read_texts = lambda docs: ((doc, data) for _, doc, _, _, data in read_documents(pool, docs, first_doc))  # noqa: E731
        split, removed, near_pairs = choose_documents(index, args, val_input, read_texts, signature_rows)
        del index, val_input  # from here on the run holds one byte per document
        if args.dedup_report:
            write_report(args.dedup_report, pool, near_pairs, first_doc, signature_rows, where, args.seed)

        model_path = choose_tokenizer(args, pool, split, removed["train_bytes"], first_doc, work)
        try:
            tokenizer = Tokenizer(str(model_path))
        except ValueError as e:
            fail(str(e))

        sha256 = sha256_of(model_path)
        tokens = work / f"tokens-{sha256[:16]}"  # another tokenizer's shards are never reused
        tokens.mkdir(exist_ok=True)
        done = finished(tokens, len(shards))
        if done:
            print(f"resuming: {len(done)} of {len(shards)} shards already tokenized")
        tokenize_started = time.time()
        run_shards(pool, tokenize_shard, [(k, split[first_doc[k]:first_doc[k + 1]], tokens, str(model_path))
                                          for k in range(len(shards)) if k not in done], sizes, "tokenize")
        tokenize_seconds = time.time() - tokenize_started

    kept_bytes = removed.pop("kept_bytes")
    del removed["train_bytes"]
    bands, rows = lsh_bands(args.dedup_threshold, args.num_perm)
    # No output replaces the previous one before all are complete, so a failed run keeps the previous
    # folder. meta.json marks a complete folder: it goes before the first replace and comes back last
    # (the stack closes its files in reverse order), so no crash between the replaces can leave a
    # meta.json describing files it does not match.
    with ExitStack() as stack:
        masks = ("train_mask.bin", "val_mask.bin") if args.chat else ()
        files = {name: stack.enter_context(atomic_write(out / name, "w" if name == "meta.json" else "wb"))
                 for name in ("meta.json", "train.bin", "train_doc_index.npy", "val.bin", "val_doc_index.npy",
                              *masks, "tokenizer.model")}
        n_tokens = assemble(tokens, len(shards), files)
        with open(model_path, "rb") as f:
            shutil.copyfileobj(f, files["tokenizer.model"])
        meta = {
            "vocab_size": tokenizer.vocab_size, "dtype": token_dtype(tokenizer.vocab_size).name,
            "eos_id": EOS_ID, "train_tokens": n_tokens["train"], "val_tokens": n_tokens["val"],
            "train_documents": int((split == 0).sum()), "val_documents": int((split == 1).sum()),
            "doc_index": {"train": "train_doc_index.npy", "val": "val_doc_index.npy"}, **removed,
            "near_dedup": {"threshold": args.dedup_threshold, "shingle": args.shingle, "ngram": args.ngram,
                           "num_perm": args.num_perm, "bands": bands, "rows": rows} if args.near_dedup else None,
            "bytes_read": sum(map(os.path.getsize, paths)), "files": len(paths), "shards": len(shards),
            "tokenizer_sha256": sha256, "skipped": dict(skipped),
            "inputs": args.input or [sysconfig.get_paths()["stdlib"]], "val_inputs": args.val_input,
            "text_field": args.text_field, "val_fraction": None if args.val_input else args.val_fraction,
            "seed": args.seed,
        }
        if args.chat:  # one uint8 per token, 1 where the token is a training target (tokenizer.render_chat)
            meta["loss_mask"] = {"train": "train_mask.bin", "val": "val_mask.bin"}
        files["meta.json"].write(json.dumps(meta, indent=2) + "\n")
        (out / "meta.json").unlink(missing_ok=True)

    print(f"{out}: {n_tokens['train']:,} train tokens ({meta['train_documents']:,} documents), "
          f"{n_tokens['val']:,} val tokens ({meta['val_documents']:,} documents), {meta['dtype']}, "
          f"vocab {tokenizer.vocab_size}")
    print(f"read {meta['bytes_read'] / 1e6:.1f} MB in {len(paths):,} files ({len(shards):,} shards); removed "
          f"{meta['duplicates_removed']:,} exact duplicates ({meta['duplicate_bytes_removed'] / 1e6:.1f} MB) and "
          f"{meta['near_duplicates_removed']:,} near-duplicates in {meta['near_duplicate_clusters']:,} clusters "
          f"({meta['near_duplicate_bytes_removed'] / 1e6:.1f} MB); filtered {meta['filtered'] or 'nothing'}; "
          f"skipped {dict(skipped) or 'nothing'}")
    tokens_per_byte = (sum(n_tokens.values()) - (split >= 0).sum()) / kept_bytes  # </s> stands for no text
    print(f"tokenized {kept_bytes / 1e6:.1f} MB in {tokenize_seconds:.1f} s ({kept_bytes / 1e6 / tokenize_seconds:.1f} "
          f"MB/s with --workers {args.workers}), {tokens_per_byte:.3f} tokens per byte not counting </s>; "
          f"{time.time() - started:.1f} s in all")


if __name__ == "__main__":
    main()
