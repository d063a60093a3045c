"""readers.py: prepare_data.py's input readers, for text files, JSONL (also .jsonl.gz, .jsonl.zst) and Parquet.

    shards, sizes = plan_shards(paths, shard_bytes=1 << 26, field="text")
    log = Log()
    for file, start, end in shards[0]:
        for line, data in piece_documents(paths[file], start, end, "text", log):
            ...  # data: the UTF-8 bytes of one document, starting at that line (a row, for Parquet)

The one idea: every format becomes one stream of (line, UTF-8 bytes) documents, read a piece of a
file at a time (a byte range of a JSONL file cut at line starts, a Parquet row group, a whole text or
compressed file; a document over CHUNK_BYTES in chunks at line boundaries), so memory does not grow
with a file. What is skipped is never silent and never stops the run: a bad line, row or file is
counted by reason in the Log and reported with its file and line (numbered within the piece;
prepare_data.py adds the lines of the pieces before it). Only what makes an input unusable as a whole
(a missing file, no text column, a missing optional package) is an error, fail().
"""
import glob
import gzip
import io
import json
import os
import sysconfig
import zlib
from collections import Counter
from pathlib import Path

from tokenizer import conversation_messages, line_chunks

# Documents longer than this are cut at line boundaries into chunks, each then a document of its own
# (own hash, own </s>). It bounds the memory and the size of a unit of work however long a file is;
# the cost is one artificial document boundary per ~300k tokens.
CHUNK_BYTES = 1 << 20
MAX_WARNINGS = 20
FOLDER_FILES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


def fail(message: str):
    """The command's one clear error: its message, no traceback. The readers raise it too, so it lives here."""
    raise SystemExit(f"prepare_data.py: error: {message}")


def input_format(path: str) -> str:
    """'parquet', 'jsonl' (also .jsonl.gz and .jsonl.zst) or 'text' (any other file is one document)."""
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        return "jsonl"
    if path.endswith((".gz", ".zst")):
        fail(f"{path}: only JSONL is read compressed (.jsonl.gz, .jsonl.zst)")
    return "text"


def resolve_inputs(specs: list[str]) -> list[str]:
    """Files named by specs: a file as is, a folder's corpus files (recursively), a glob pattern."""
    files = []
    for spec in specs:
        matches = [spec] if os.path.exists(spec) else sorted(glob.glob(spec, recursive=True))
        if not matches:
            fail(f"no file matches the pattern {spec}" if glob.has_magic(spec)
                 else f"no such file or folder: {spec}")
        for match in matches:
            if os.path.isdir(match):
                found = sorted(str(p) for p in Path(match).rglob("*")
                               if p.name.endswith(FOLDER_FILES) and p.is_file())
                if not found:
                    fail(f"folder {match} holds no .txt, .jsonl (.gz, .zst) or .parquet files")
                files += found
            else:
                files.append(match)
    for path in files:
        input_format(path)
    return files


def stdlib_sources() -> list[str]:
    """The default corpus: every .py file of the running Python's standard library. The walk never enters
    site-packages: installed packages are not the standard library, and listing them cost most of a second."""
    files = []
    for folder, subfolders, names in os.walk(sysconfig.get_paths()["stdlib"]):
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages")]
        files += [os.path.join(folder, name) for name in names if name.endswith(".py")]
    return sorted(files)


def open_parquet(path: str, field: str):
    """A pyarrow ParquetFile, after checking that it has a string column named field."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        fail(f"{path}: reading Parquet needs the pyarrow package (pip install pyarrow)")
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        fail(f"{path} is not a readable Parquet file: {e}")
    schema = parquet.schema_arrow
    if field not in schema.names or not (pa.types.is_string(schema.field(field).type)
                                         or pa.types.is_large_string(schema.field(field).type)):
        fail(f'{path} has no string column "{field}" (its columns: {", ".join(schema.names)}); '
             "name the text column with --text_field")
    return parquet


def zstd_blocks(path: str):
    """Decompressed blocks of a .zst file, frame after frame. The zstandard package's own stream
    reader ends quietly where a file is cut short; here that is an EOFError, as gzip raises."""
    import zstandard
    frame = None
    with open(path, "rb") as f:
        data = f.read(1 << 20)
        while data:
            frame = frame or zstandard.ZstdDecompressor().decompressobj()
            try:
                block = frame.decompress(data)
            except zstandard.ZstdError as e:
                raise OSError(str(e)) from None
            yield block
            if frame.eof:  # a frame ended; what follows it starts the next one
                frame, data = None, frame.unused_data
            data = data or f.read(1 << 20)
    if frame:
        raise EOFError("compressed data ends in the middle of a frame")


def jsonl_lines(path: str, start: int, end: int | None):
    """The lines of a JSONL file from byte start to end (a compressed file is read whole)."""
    if path.endswith(".zst"):
        rest = b""
        for block in zstd_blocks(path):
            *lines, rest = (rest + block).split(b"\n")
            yield from lines
        if rest:
            yield rest
    elif path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            yield from f
    else:
        with open(path, "rb") as f:
            f.seek(start)
            while start < end and (line := f.readline()):
                start += len(line)
                yield line


class Log:
    """What reading one shard skipped, by reason; its first warnings; the lines of each piece read."""

    def __init__(self):
        self.counts, self.warnings, self.n_warnings, self.piece_lines = Counter(), [], 0, []

    def skip(self, reason: str, line: int | None = None, message: str | None = None):
        """Count a skip; a message is a warning about line (None: about the whole file) of this piece."""
        self.counts[reason] += 1
        if message:
            self.n_warnings += 1
            if len(self.warnings) < MAX_WARNINGS:
                self.warnings.append((len(self.piece_lines), line, message))


def record_text(line: bytes, field: str | None) -> bytes:
    """UTF-8 of a JSONL line's text field (field None: the line's conversation, as the canonical JSON of its
    messages, so that one conversation in minimind's and in OpenAI's format is one exact duplicate); a ValueError
    says what is wrong with the line."""
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    except ValueError:
        raise ValueError("not valid JSON") from None
    if field is None:
        try:
            return json.dumps(conversation_messages(record), ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ValueError("a message holds an unpaired surrogate escape") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if not isinstance(record.get(field), str):
        raise ValueError(f'no string "{field}" field')
    try:
        return record[field].encode()
    except UnicodeEncodeError:
        raise ValueError(f'"{field}" holds an unpaired surrogate escape') from None


def document_chunks(line: int, data: bytes, log: Log):
    """(line, text) of a document, or of each of its chunks if it is longer than CHUNK_BYTES."""
    if not data:
        log.skip("empty documents")
    elif len(data) <= CHUNK_BYTES:
        yield line, data
    else:
        for _, chunk in line_chunks(io.BytesIO(data), CHUNK_BYTES):
            yield line, chunk


def jsonl_documents(path: str, start: int, end: int | None, field: str | None, log: Log):
    lineno = 0
    try:
        for lineno, line in enumerate(jsonl_lines(path, start, end), 1):
            if not line.strip():
                continue
            try:
                data = record_text(line, field)
            except ValueError as e:
                log.skip("malformed JSONL lines" if field else "malformed conversations", lineno, f"{e}, line skipped")
                continue
            if field is None and len(data) > CHUNK_BYTES:  # a conversation cut in two would be two wrong ones
                log.skip("conversations over CHUNK_BYTES", lineno, f"longer than {CHUNK_BYTES:,} bytes, line skipped")
                continue
            yield from document_chunks(lineno, data, log)
    except (OSError, EOFError, zlib.error) as e:
        log.skip("unreadable files", lineno + 1, f"cannot decompress ({e}): the file is cut short or "
                 "corrupt; rest of file skipped")
    log.piece_lines.append(lineno)


def parquet_documents(path: str, first: int, end: int, field: str, log: Log):
    import pyarrow as pa
    import pyarrow.parquet as pq
    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, row_groups=range(first, end), columns=[field]):
            for data in batch.column(0).cast(pa.large_binary()).to_pylist():  # bytes: Arrow strings are UTF-8
                row += 1
                if data is None:
                    log.skip("malformed Parquet rows", row, f'no "{field}" value, row skipped')
                else:
                    yield from document_chunks(row, data, log)
    except (OSError, pa.ArrowException) as e:
        log.skip("unreadable files", row + 1, f"cannot read ({e}): the file is corrupt; rest of row group skipped")
    log.piece_lines.append(row)


def text_documents(path: str, log: Log):
    """A text file is one document (in chunks at line boundaries); one that is not UTF-8 is skipped."""
    with open(path, "rb") as f:
        lines = 0
        for _, data in line_chunks(f, CHUNK_BYTES):  # check all of it before yielding any of it
            try:
                data.decode()
            except UnicodeDecodeError as e:
                line = lines + data.count(b"\n", 0, e.start) + 1
                log.skip("non-UTF-8 files", None, f"not UTF-8 at line {line}, file skipped")
                break
            lines += data.count(b"\n")
        else:
            if f.tell() == 0:
                log.skip("empty documents")
            f.seek(0)
            line = 1
            for _, data in line_chunks(f, CHUNK_BYTES):
                yield line, data
                line += data.count(b"\n")
    log.piece_lines.append(lines)


def plan_shards(paths: list[str], shard_bytes: int, field: str) -> tuple[list[list[tuple]], list[int]]:
    """Cut the corpus into shards of about shard_bytes: (file, start, end) pieces and their bytes.

    Small files are grouped in order; a big JSONL file is cut at line starts and a Parquet file at
    row groups; a compressed file is one piece, since it can only be read from its start.
    """
    pieces = []
    for file, path in enumerate(paths):
        size = os.path.getsize(path)
        if input_format(path) == "parquet":
            meta = open_parquet(path, field).metadata
            pieces += [(file, g, g + 1, meta.row_group(g).total_byte_size) for g in range(meta.num_row_groups)]
        elif path.endswith(".jsonl"):
            cuts = [0]
            with open(path, "rb") as f:
                while cuts[-1] + shard_bytes < size:
                    f.seek(cuts[-1] + shard_bytes - 1)
                    f.readline()  # to the start of the first line at least shard_bytes after the last cut
                    if f.tell() >= size:
                        break
                    cuts.append(f.tell())
            cuts.append(size)
            pieces += [(file, a, b, b - a) for a, b in zip(cuts[:-1], cuts[1:])]
        else:
            if path.endswith(".zst"):
                try:
                    import zstandard  # noqa: F401
                except ImportError:
                    fail(f"{path}: reading .zst needs the zstandard package (pip install zstandard)")
            pieces.append((file, 0, None, size))
    shards, sizes = [[]], [0]
    for *piece, size in pieces:
        if sizes[-1] >= shard_bytes:
            shards.append([])
            sizes.append(0)
        shards[-1].append(tuple(piece))
        sizes[-1] += size
    return (shards, sizes) if shards[0] else ([], [])


def piece_documents(path: str, start: int, end: int | None, field: str | None, log: Log):
    """(line, UTF-8 text) of every document of one piece of plan_shards: bytes start to end of a JSONL
    file, row groups start to end of a Parquet file, or a whole text or compressed file. field None: the
    JSONL lines are conversations (record_text)."""
    kind = input_format(path)
    if kind == "parquet":
        return parquet_documents(path, start, end, field, log)
    if kind == "jsonl":
        return jsonl_documents(path, start, end, field, log)
    return text_documents(path, log)
