"""The myllm tokenizer: a lossless sentencepiece BPE, how to train it, and the Tokenizer class.

Train:  python tokenizer.py --input notes.txt code.py --vocab_size 6400 --out data/mine
Use:    tok = Tokenizer("data/mine/tokenizer.model"); ids = tok.encode("def f():\n\treturn 1")

The one idea: decode(encode(s)) == s for every string. A model can only learn to write what it is
shown, and sentencepiece's defaults rewrite text before it is tokenized (NFKC normalisation, folded
whitespace, newlines turned into spaces), which silently corrupts code. Here nothing is normalised, a
character the vocabulary lacks falls back to its UTF-8 bytes (one piece per byte, so no character is
ever unknown), and the one character sentencepiece itself cannot carry, a literal U+2581, is escaped.
"""
import argparse
import io
import os
import re
from collections import Counter
from typing import Iterable

import numpy as np
import sentencepiece as spm

from files import atomic_write

# Fixed ids, reserved before any learned piece, so that other files can use the names.
PAD_ID, UNK_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(6)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TOKENS = {i: SPECIAL_TOKENS[i] for i in (IM_START_ID, IM_END_ID)}
ROLES = ("system", "user", "assistant")  # of a conversation's messages (Tokenizer.render_chat)
# The 6 special tokens, the newline and the 256 byte-fallback pieces are in every vocabulary.
FIXED_PIECES = len(SPECIAL_TOKENS) + 1 + 256
MIN_VOCAB_SIZE = 300  # room for the fixed pieces plus a few dozen characters and merges
MAX_VOCAB_SIZE = 2**20  # 4x the largest vocabularies in use (~256k); anything above is a typo

# sentencepiece writes a space as U+2581 ('▁') inside pieces and turns every '▁' back into a space
# on decode, so a '▁' typed in the text would come back as ' '. encode() cuts the text at each
# literal '▁' and emits it as its three UTF-8 byte pieces, which decode to the character itself. The
# escape needs no marker that could collide with real text: '▁' is always in the vocabulary (see
# required_chars), so sentencepiece itself never produces those three bytes.
SPACE_MARK = "\u2581"
MAX_PIECE_CHARS = 16  # sentencepiece's max_sentencepiece_length: the longest piece BPE may learn
PIECE_BYTES = 4096  # size of the 'sentences' fed to the trainer (its max_sentence_length)
# The trainer holds every sentence in memory, several times the text's size: train on a sample.
MAX_TRAIN_BYTES = 100_000_000
MIN_CHARACTER_COVERAGE = 0.98  # the lowest sentencepiece accepts
REPEATED_RUN = re.compile(r"(.)\1{%d,}" % MAX_PIECE_CHARS, re.DOTALL)
# encode_batch() hands sentencepiece strings of at least this many characters, cut after a newline (see there).
ENCODE_PIECE_CHARS = 256
ENCODE_PIECES = re.compile(r".{%d,}?\n|.+" % ENCODE_PIECE_CHARS, re.DOTALL)  # the last piece may end anywhere


def conversation_messages(record) -> list[dict]:
    """The messages of one conversation record, in either format people have: minimind's {"conversations":
    [...]} or the OpenAI / Hugging Face {"messages": [...]}, each message {"role", "content"} with a role in
    ROLES. ValueError says what is wrong with a record that is not a usable conversation."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    messages = record.get("messages", record.get("conversations"))
    if not isinstance(messages, list):
        raise ValueError('no "messages" or "conversations" list')
    if not messages:
        raise ValueError("an empty conversation")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"a {message['role']} message without string content")
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError("no assistant turn")
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def check_vocab_size(vocab_size: int) -> None:
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be between {MIN_VOCAB_SIZE} and {MAX_VOCAB_SIZE:,} "
                         f"({FIXED_PIECES} ids are taken by special tokens, the newline and the "
                         f"256 byte pieces), got {vocab_size}")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id below vocab_size: the token files' format."""
    if not 0 < vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be between 1 and {MAX_VOCAB_SIZE:,}, got {vocab_size}")
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def collapse_runs(text: str) -> str:
    """Cut every run of one repeated character down to MAX_PIECE_CHARS characters (training text only).

    BPE buys vocabulary by pair frequency: a single 79-character '====' ruler adds 78 counts of the
    pair '==', then dozens more for '====', and a corpus of banners, dashed lines and deep
    indentation would spend many slots on pieces of every length of '=', '-' or ' '. No piece can be
    longer than MAX_PIECE_CHARS, so a capped run still teaches every piece a long run could; it only
    stops repetition from outvoting real text. Encoding is unaffected: any run still tokenizes.
    """
    return REPEATED_RUN.sub(lambda m: m.group(1) * MAX_PIECE_CHARS, text)


def line_chunks(f, limit: int):
    """Yield (offset, data): consecutive pieces of the binary file f, each at most limit bytes.

    A piece ends after the last newline that fits; a line longer than limit is cut before its last
    character that fits, so each piece of valid UTF-8 also decodes on its own. Memory stays at one
    piece however large the file or its lines are.
    """
    offset = f.tell()
    while block := f.read(limit):
        cut = len(block)
        if cut == limit:
            cut = block.rfind(b"\n") + 1 or utf8_char_start(block)
            f.seek(offset + cut)
        yield offset, block[:cut]
        offset += cut


def utf8_char_start(data: bytes) -> int:
    """Index where the last character of data starts (bytes 10xxxxxx continue a character)."""
    i = len(data) - 1
    while i > 0 and data[i] & 0xC0 == 0x80:
        i -= 1
    return i or len(data)


def character_coverage(char_counts: Counter, vocab_size: int) -> float:
    """The share of the text whose characters get a piece of their own; the rest falls back to bytes.

    sentencepiece's usual 0.9995 keeps 3,000-5,000 characters of Chinese text, which would fill a
    6,400 vocabulary before a single merge is learned (and fails outright when it exceeds the
    vocabulary). Byte fallback keeps rare characters lossless anyway, so single characters get at
    most half of the free ids, within the 0.98 floor that sentencepiece accepts.
    """
    counts = np.sort(np.fromiter(char_counts.values(), dtype=np.int64))[::-1]
    covered = np.cumsum(counts) / counts.sum()  # covered[k]: share of the k + 1 commonest characters
    needed = int(np.searchsorted(covered, MIN_CHARACTER_COVERAGE)) + 1
    if FIXED_PIECES + needed + 2 > vocab_size:  # + '▁', always kept, + 1 for the trainer's rounding
        raise ValueError(f"vocab_size {vocab_size} is too small for this text: covering "
                         f"{MIN_CHARACTER_COVERAGE:.0%} of it takes {needed} distinct characters")
    budget = min((vocab_size - FIXED_PIECES) // 2, len(counts))
    return float(np.clip(covered[budget - 1], MIN_CHARACTER_COVERAGE, 0.9995))


def train_tokenizer(documents: Iterable[str], vocab_size: int, out_dir: str,
                    max_train_bytes: int = MAX_TRAIN_BYTES) -> str:
    """Train on the first max_train_bytes of documents; write out_dir/tokenizer.model; return its path."""
    check_vocab_size(vocab_size)
    pieces, char_counts, size = [], Counter(), 0
    for doc in documents:
        # Cutting at line boundaries loses no merge: none spans a '\n' (a user-defined symbol).
        for _, data in line_chunks(io.BytesIO(collapse_runs(doc).encode()), PIECE_BYTES):
            pieces.append(data.decode())
            char_counts.update(pieces[-1])
            size += len(data)
            if size >= max_train_bytes:
                break
        if size >= max_train_bytes:
            break
    if not pieces:
        raise ValueError("no training text: every document is empty")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(pieces), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        # A small corpus may not have vocab_size distinct pieces; the real size is read from the model.
        hard_vocab_limit=False,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        # Numbers are rarely repeated exactly; digit pieces keep arithmetic learnable.
        split_digits=True,
        character_coverage=character_coverage(char_counts, vocab_size),
        max_sentencepiece_length=MAX_PIECE_CHARS, max_sentence_length=PIECE_BYTES,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        pad_piece=SPECIAL_TOKENS[PAD_ID], unk_piece=SPECIAL_TOKENS[UNK_ID],
        bos_piece=SPECIAL_TOKENS[BOS_ID], eos_piece=SPECIAL_TOKENS[EOS_ID],
        # Chat tokens are control symbols: only code that builds a prompt can insert them, by id.
        # Text that merely contains '<|im_start|>' (a user message, a scraped web page) is encoded
        # as the characters it is, so it cannot forge a turn boundary, and round-trips as text.
        control_symbols=list(CHAT_TOKENS.values()),
        # '\n' is always a piece of its own: lines stay visible to the model, and no merge spans two.
        user_defined_symbols=["\n"],
        # Text without spaces would leave '▁' out of the vocabulary; a space would then fall back to
        # the bytes of '▁' and decode as '▁'.
        required_chars=SPACE_MARK,
        num_threads=os.cpu_count(), minloglevel=2)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.model")
    with atomic_write(path) as f:
        f.write(model.getvalue())
    return path


class Tokenizer:
    """Text <-> token ids; every id below vocab_size decodes to text (special tokens as noted)."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer model at {path} (train one with tokenizer.py)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(path)
        except RuntimeError:
            raise ValueError(f"{path} is not a sentencepiece model") from None
        if [self.sp.id_to_piece(i) for i in range(len(SPECIAL_TOKENS))] != SPECIAL_TOKENS:
            raise ValueError(f"{path} was not trained by tokenizer.py: its special token ids differ")
        self.vocab_size = self.sp.get_piece_size()
        self.space_mark_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARK.encode()]
        self.newline_ids = self.encode("\n")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [BOS_ID] * bos + self.encode_batch([text], num_threads=1)[0] + [EOS_ID] * eos

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts at once on num_threads threads (default: all cores).

        sentencepiece gets each text in pieces of a few hundred characters, each ending after a newline: its BPE
        spends more per character the longer the string it is given (whole source files encode ~25% slower than
        the same text in such pieces), and the cuts change no token, since no merge spans a '\n' (a
        user-defined symbol). A text is also cut at each literal '▁', which goes in as its bytes (SPACE_MARK).
        """
        pieces, counts = [], []  # counts[i][j]: how many pieces part j of text i (between '▁'s) became
        for text in texts:
            counts.append([])
            for part in text.split(SPACE_MARK):
                cut = ENCODE_PIECES.findall(part)
                pieces += cut
                counts[-1].append(len(cut))
        encoded = iter(self.sp.encode(pieces, num_threads=num_threads or os.cpu_count()))
        out = []
        for parts in counts:
            ids = []
            for j, n_pieces in enumerate(parts):
                if j:
                    ids += self.space_mark_ids
                for _ in range(n_pieces):
                    ids += next(encoded)
            out.append(ids)
        return out

    def decode(self, ids) -> str:
        """Text of ids; chat tokens appear as their literal text, pad/unk/bos/eos as nothing.

        The chat tokens are written here rather than by sentencepiece, which drops control tokens;
        splitting at them also means nothing (no space) is ever inserted next to one.
        """
        text, run = [], []
        for i in map(int, ids):
            if i in CHAT_TOKENS:
                text += [self.sp.decode(run), CHAT_TOKENS[i]]
                run = []
            elif i > EOS_ID:
                run.append(i)
        return "".join(text) + self.sp.decode(run)

    def render_chat(self, messages: list[dict], generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """A conversation in ChatML, as ids, and its loss mask: 1 on the tokens a model learns to write (each
        assistant reply and the <|im_end|> that closes it), 0 on everything it only reads.

            <|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n

        The chat tokens go in by id around text encoded as text, so a message that contains the characters
        "<|im_start|>assistant" is just those characters: no user can forge a turn. Each part is encoded on its
        own; since no merge spans a '\n', the header "role\n" tokenizes the same wherever it stands, and a reply
        generated after the header (generation_prompt=True appends "<|im_start|>assistant\n") is tokenized as
        the replies the model was trained on.
        """
        ids, mask = [], []
        for message in messages:
            header = [IM_START_ID, *self.encode(message["role"] + "\n")]
            body = [*self.encode(message["content"]), IM_END_ID]
            is_target = int(message["role"] == "assistant")
            ids += header + body + self.newline_ids
            mask += [0] * len(header) + [is_target] * len(body) + [0] * len(self.newline_ids)
        if generation_prompt:
            ids += [IM_START_ID, *self.encode("assistant\n")]
            mask += [0] * (len(ids) - len(mask))
        return ids, mask

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes each id adds to decoded text: the per-token denominator of bits per byte."""
        sizes = []
        for i in range(self.vocab_size):
            if i in CHAT_TOKENS:
                sizes.append(len(CHAT_TOKENS[i].encode()))
            elif self.sp.is_control(i) or self.sp.is_unknown(i):
                sizes.append(0)
            elif self.sp.is_byte(i):
                sizes.append(1)
            else:
                sizes.append(len(self.sp.id_to_piece(i).replace(SPACE_MARK, " ").encode()))
        return sizes


def read_text_files(paths):
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                yield f.read()
        except UnicodeDecodeError as e:
            raise SystemExit(f"tokenizer.py: error: {path} is not UTF-8 text (byte {e.start})")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the myllm BPE tokenizer on UTF-8 text files.")
    parser.add_argument("--input", nargs="+", required=True, help="text files, each one document")
    parser.add_argument("--vocab_size", type=int, default=6400)
    parser.add_argument("--out", required=True, help="folder to write tokenizer.model into")
    args = parser.parse_args(argv)
    for path in args.input:
        if not os.path.isfile(path):
            raise SystemExit(f"tokenizer.py: error: no such file: {path}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f"tokenizer.py: error: --out {args.out} exists and is not a folder")
    try:
        path = train_tokenizer(read_text_files(args.input), args.vocab_size, args.out)
    except ValueError as e:
        raise SystemExit(f"tokenizer.py: error: {e}")
    except OSError as e:  # an --out that cannot be created or written
        raise SystemExit(f"tokenizer.py: error: cannot write {e.filename or args.out}: {e.strerror}")
    print(f"wrote {path} ({Tokenizer(path).vocab_size} tokens)")


if __name__ == "__main__":
    main()
