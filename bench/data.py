"""
bench/data.py: prepare_data.py's speed, memory and near-duplicate accuracy, against sentencepiece itself.

    python bench/data.py                      # the default corpus, then synthetic corpora of 30 and 300 MB
    python bench/data.py --synthetic_mb 100   # synthetic corpora of 10 and 100 MB

The yardstick for turning text into token ids on a CPU is the tokenizer: sentencepiece's own encode
of the same documents, already in memory, each document one string, on one thread per core.
prepare_data.py reads, filters, deduplicates (exact and MinHash), tokenizes and writes; its MB/s end
to end over that rate is the ratio its goal is set on. It tokenizes through Tokenizer.encode_batch,
which hands sentencepiece pieces of a few hundred characters cut after newlines (the same tokens,
faster), so the table also shows encode_batch alone on the same documents: the ratio to that is the
share of the machine that goes to tokenizing. The synthetic corpus is made from the
standard library's paragraphs, each document a fresh mix of them, with planted near-duplicates
(another footer, a licence header, paragraphs reordered, lines edited) and planted hard negatives
(documents sharing half or 80% of their paragraphs with another: Jaccard about 0.35 and 0.7, which
must stay). Every document starts with its id, so the ids found in train.bin and val.bin say what
was kept. Peak RSS is the sum over prepare_data.py and its workers, sampled every 20 ms, at a tenth
of the synthetic size and at the full size: a pipeline whose memory does not grow with the corpus
shows about the same number twice.
"""

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from readers import stdlib_sources  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

HEADERS = ["# Copyright (c) 2019 Example Corp. All rights reserved.\n# Licensed under the MIT License; see "
           "the LICENSE file in the project root.\n",
           "# SPDX-License-Identifier: Apache-2.0\n# Part of a project under the Apache License 2.0; see NOTICE.\n"]
FOOTERS = ["\n# posted by alice, 3 comments\n", "\n# shared by bob on Monday\n",
           "\n# mirrored; report errors upstream\n"]


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all of its descendants."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, IndexError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def run_prepare(args: list[str]) -> tuple[float, float, int]:
    """Run prepare_data.py; return its wall seconds, CPU seconds (with its workers') and the peak RSS
    of its process tree in bytes."""
    started, peak, cpu = time.time(), 0, cpu_seconds()
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "prepare_data.py"), *args], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    while process.poll() is None:
        peak = max(peak, tree_rss(process.pid))
        time.sleep(0.02)
    seconds, output = time.time() - started, process.stdout.read()
    if process.returncode:
        raise SystemExit(f"prepare_data.py {' '.join(args)} failed:\n{output}")
    print(output.strip())
    return seconds, cpu_seconds() - cpu, peak


def cpu_seconds() -> float:
    """CPU time (user + system) of the finished child processes, theirs included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tokenizer_seconds(model: str, batches, threads: int, whole: bool) -> tuple[float, float, float]:
    """(text MB, wall seconds, CPU seconds) of encoding the batches of documents (lists, as is fastest) on
    threads threads: with sentencepiece itself, each document one string (whole=True), or with
    Tokenizer.encode_batch as prepare_data.py calls it, which hands sentencepiece pieces cut after newlines."""
    tokenizer, size, wall, cpu = Tokenizer(model), 0, 0.0, 0.0
    for texts in batches:
        size += sum(len(t.encode()) for t in texts)
        started, cpu_started = time.time(), time.process_time()
        if whole:
            tokenizer.sp.encode(texts, num_threads=threads)
        else:
            tokenizer.encode_batch(texts, num_threads=threads)
        wall, cpu = wall + time.time() - started, cpu + time.process_time() - cpu_started
    return size / 1e6, wall, cpu


def jsonl_texts(path: str, limit_mb: float = 64):
    """The documents of a JSONL file, in lists of about limit_mb."""
    texts, size = [], 0
    with open(path) as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(texts[-1])
            if size > limit_mb * 1e6:
                yield texts
                texts, size = [], 0
    if texts:
        yield texts


def shingles(text: str) -> set[str]:
    return {text[i:i + 5] for i in range(len(text) - 4)}


def jaccard(a: str, b: str) -> float:
    return len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))


def write_synthetic(path: str, small_path: str, size_mb: float, seed: int = 0) -> dict:
    """Write a JSONL corpus of about size_mb of standard-library paragraphs with planted pairs to path,
    and its first tenth to small_path. Returns the planted pairs as (original id, copy id, kind, exact
    Jaccard similarity), and the number of documents in each file."""
    rng = random.Random(seed)
    paragraphs = []
    for source in stdlib_sources():
        try:
            with open(source, encoding="utf-8") as f:
                paragraphs += [p for p in f.read().split("\n\n") if 200 <= len(p) <= 1500]
        except UnicodeDecodeError:
            pass

    def fresh() -> list[str]:
        """A new document: four or more paragraphs, so two of them never agree by chance on most of their text."""
        parts, target = [], rng.uniform(2000, 8000)
        while sum(map(len, parts)) < target or len(parts) < 4:
            parts.append(rng.choice(paragraphs))
        return parts

    def near_copy(parts: list[str]) -> str:
        kind = rng.choice(["footer", "header", "reorder", "edit"])
        if kind == "footer":
            return "\n\n".join(parts) + rng.choice(FOOTERS)
        if kind == "header":
            return rng.choice(HEADERS) + "\n\n".join(parts)
        parts = parts[:]
        if kind == "reorder":
            i, j = rng.sample(range(len(parts)), 2) if len(parts) > 1 else (0, 0)
            parts[i], parts[j] = parts[j], parts[i]
            return "\n\n".join(parts)
        lines = "\n\n".join(parts).split("\n")
        for i in rng.sample(range(len(lines)), max(1, len(lines) // 40)):  # ~2.5% of the lines rewritten
            lines[i] = rng.choice(rng.choice(paragraphs).split("\n"))
        return "\n".join(lines)

    def sharing_copy(parts: list[str], share: float) -> str:
        kept = [p for p in parts if rng.random() < share]
        return "\n\n".join(kept + fresh()[:max(1, len(parts) - len(kept))])

    planted, pending, n_docs, size, small_docs, slot = [], {}, 0, 0, 0, 0
    with open(path, "w") as f, open(small_path, "w") as small:
        while size < size_mb * 1e6:
            parts = fresh()
            for kind, original, original_text, body in pending.pop(slot, []) + [(None, None, None, "\n\n".join(parts))]:
                text = f"# doc {n_docs:07d}\n{body}"
                line = json.dumps({"text": text}) + "\n"
                f.write(line)
                size += len(line)
                if size <= size_mb * 1e5:
                    small.write(line)
                    small_docs = n_docs + 1
                if kind:
                    planted.append((original, n_docs, kind, jaccard(original_text, text)))
                n_docs += 1
            draw = rng.random()  # text is now the fresh document's, written last
            copy = (("near-duplicate", near_copy(parts)) if draw < 0.08 else ("shares 50%", sharing_copy(parts, 0.5))
                    if draw < 0.10 else ("shares 80%", sharing_copy(parts, 0.8)) if draw < 0.12 else None)
            if copy:  # later, but within a few shards: the copy is in the small corpus too, mostly
                pending.setdefault(slot + rng.randint(1, 2000), []).append((copy[0], n_docs - 1, text, copy[1]))
            slot += 1
    return {"planted": planted, "docs": n_docs, "small_docs": small_docs}


def kept_ids(out: str) -> set[int]:
    """The ids of the documents in out's train.bin and val.bin, read from each document's first tokens."""
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    tokenizer, ids = Tokenizer(os.path.join(out, "tokenizer.model")), set()
    for split in ("train", "val"):
        tokens = np.memmap(os.path.join(out, f"{split}.bin"), dtype=meta["dtype"], mode="r")
        for start in np.load(os.path.join(out, meta["doc_index"][split])):
            ids.add(int(re.match(r"# doc (\d+)", tokenizer.decode(tokens[start:start + 16])).group(1)))
    return ids


def accuracy(kept: set[int], n_docs: int, planted: list[tuple], threshold: float = 0.8) -> tuple:
    """Near-duplicate removal over the first n_docs documents, taking as the truth the planted pairs
    whose exact Jaccard similarity reaches the threshold (no other two documents come close):
    precision, recall, and the planted pairs below the threshold (how many, how many lost a document,
    the highest similarity among those)."""
    pairs = [(a, b, j) for a, b, _, j in planted if b < n_docs]
    positives = [(a, b) for a, b, j in pairs if j >= threshold]
    found = [(a, b) for a, b in positives if (a in kept) != (b in kept)]  # exactly one of the two is gone
    removed = set(range(n_docs)) - kept
    right = {b if a in kept else a for a, b in found}
    negatives = [(a, b, j) for a, b, j in pairs if j < threshold]
    lost = [j for a, b, j in negatives if not {a, b} <= kept]
    return len(right) / max(1, len(removed)), len(found) / max(1, len(positives)), len(negatives), lost


def stdlib_texts():
    """The default corpus as prepare_data.py reads it (its UTF-8 files), as one batch."""
    texts = []
    for path in stdlib_sources():
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except UnicodeDecodeError:
            pass
    yield texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic_mb", type=float, default=300, help="size of the big synthetic corpus "
                        "(the small one is a tenth of it)")
    parser.add_argument("--work_dir", help="where corpora and outputs go (default: a temporary folder, removed)")
    args = parser.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_data_")
    threads = os.cpu_count()
    rows = []  # (name, text MB, prepare_data.py (wall, cpu, rss), sentencepiece (wall, cpu), accuracy)
    try:
        print(f"load average before: {os.getloadavg()}")
        default = os.path.join(work, "default")
        trained = run_prepare(["--out", default])
        model = os.path.join(default, "tokenizer.model")

        def measure(name: str, inputs: list[str], batches, corpus: dict | None = None, n_docs: int = 0):
            """The tokenizer alone (both ways), prepare_data.py (reusing the tokenizer), the tokenizer alone
            again: each rate is the mean of before and after, so a change of load on a shared machine shows in
            both."""
            out = os.path.join(work, "out")
            os.makedirs(out)
            shutil.copy(model, out)
            before = [tokenizer_seconds(model, batches(), threads, whole) for whole in (True, False)]
            run = run_prepare([*inputs, "--out", out])
            after = [tokenizer_seconds(model, batches(), threads, whole) for whole in (True, False)]
            quality = accuracy(kept_ids(out), n_docs, corpus["planted"]) if corpus else None
            shutil.rmtree(out)
            alone = [((b[1] + a[1]) / 2, (b[2] + a[2]) / 2) for b, a in zip(before, after)]
            rows.append((name, before[0][0], run, *alone, quality))

        measure("default corpus (stdlib .py files)", [], stdlib_texts)
        big, small = os.path.join(work, "synthetic.jsonl"), os.path.join(work, "synthetic_small.jsonl")
        started = time.time()
        corpus = write_synthetic(big, small, args.synthetic_mb)
        print(f"wrote {corpus['docs']:,} documents in {time.time() - started:.0f} s; planted pairs:")
        for kind in ("near-duplicate", "shares 50%", "shares 80%"):
            j = np.array([j for _, _, k, j in corpus["planted"] if k == kind])
            print(f"  {kind}: {len(j)}, exact Jaccard min {j.min():.2f} median {np.median(j):.2f} "
                  f"max {j.max():.2f}, {(j >= 0.8).sum()} at 0.8 or more")
        for path, n_docs in ((small, corpus["small_docs"]), (big, corpus["docs"])):
            measure(f"synthetic JSONL, {n_docs:,} documents", ["--input", path], lambda: jsonl_texts(path),
                    corpus, n_docs)
        print(f"load average after: {os.getloadavg()}")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\ndefault corpus with the tokenizer trained in the run: {trained[0]:.1f} s, "
          f"peak RSS {trained[2] / 2**20:.0f} MiB")
    print(f"\n| corpus | text MB | prepare_data.py | sentencepiece alone, whole documents, {threads} threads | ratio "
          "| encode_batch alone (pieces cut after newlines) | ratio | CPU s, prepare_data.py / sentencepiece "
          "| peak RSS | near-dup precision / recall | planted pairs below 0.8 that lost one |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, mb, (wall, cpu, rss), (sp_wall, sp_cpu), (pieces_wall, _), quality in rows:
        if quality:
            precision, recall, negatives, lost = quality
            cells = f"{precision:.3f} / {recall:.3f} | {len(lost)} of {negatives}" + (
                f" (Jaccard {min(lost):.2f} to {max(lost):.2f})" if lost else "")
        else:
            cells = "- | -"
        print(f"| {name} | {mb:.1f} | {wall:.1f} s, {mb / wall:.2f} MB/s | {mb / sp_wall:.2f} MB/s | "
              f"{sp_wall / wall:.2f} | {mb / pieces_wall:.2f} MB/s | {pieces_wall / wall:.2f} | {cpu:.1f} / {sp_cpu:.1f} | "
              f"{rss / 2**20:.0f} MiB | {cells} |")
    big_rss, small_rss = rows[-1][2][2], rows[-2][2][2]
    print(f"\npeak RSS, {rows[-1][1]:.0f} MB / {rows[-2][1]:.0f} MB of synthetic input: {big_rss / small_rss:.3f}")


if __name__ == "__main__":
    main()
