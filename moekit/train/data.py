"""Training text: the embedded default corpus, user data, tokenisation with an on-disk cache, batches.

The default corpus is the Python standard library's source of the running interpreter (every
``*.py`` under ``sysconfig.get_paths()["stdlib"]``, site-packages excluded: about 30 MB of real code,
comments and docstrings on any machine with Python). The few files that are not valid UTF-8 (the
interpreter's own encoding tests, such as ``test/encoded_modules/module_iso_8859_1.py``) are left
out for every tokenizer, so a BPE tokenizer can read the corpus and byte-level and BPE runs see the
same documents. Files are read in sorted order of their relative path and split into train and
validation *by file*: a file is validation when the first 8 bytes of sha256(relative path) read as
an integer fall in the lowest ``val_fraction`` of the range, so the split never changes with the
machine or the file order.

A source of one document (one file, a directory holding one file, a JSONL file with one non-blank
line) is split *inside* the document instead: validation is its tail (see :func:`hold_out_tail`),
training the text before it, so no text is on both sides. :func:`open_corpus` says so on stderr.

Text tokenizers (BPE, a ``tokenizer.json``) need UTF-8: user data is checked before anything is
tokenised, and a file that is not UTF-8 is named with the byte offset of the first bad byte. The
byte tokenizer reads any bytes.

Tokens are cached as ``.npy`` arrays under ``$MOEKIT_CACHE`` (default ``~/.cache/moekit``), keyed by
the document list (names, byte ranges, file sizes and mtimes), the split and the tokenizer, and
memory-mapped on load: a second run starts at once. Each split is tokenised on its own, so
evaluation reads only the validation split.

Batches are stateless: batch (step, micro) draws its window starts from a generator seeded by
(seed, step, micro), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

DOC_SEPARATOR = "\n"
EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
SPLITS = ("train", "val")


@dataclass
class Document:
    name: str  # relative path (or "file.jsonl:line")
    path: Path
    line: int | None = None  # JSONL line number (0-based), else None
    offset: int = 0  # JSONL: byte offset of the line
    # [start, end) of the document's bytes (the file's, or a JSONL text's UTF-8) when only part of it
    # belongs here: the two halves of a one-document source; None for the whole document
    span: tuple[int, int] | None = None


def _stable_fraction(name: str) -> float:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def default_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass
class _Found:
    docs: list[Document]
    source: str
    skipped: list[Path] = field(default_factory=list)  # default corpus files left out: not UTF-8


def _find(path: str | Path | None) -> _Found:
    if path is None:
        root = default_corpus_root()
        files = sorted(p for p in root.rglob("*.py") if p.is_file()
                       and not EXCLUDED_DIRS.intersection(p.relative_to(root).parts))
        if not files:
            raise FileNotFoundError(f"the default corpus (Python's standard library) has no .py files under {root}")
        # NOTE: decided here, for every tokenizer, so byte and BPE runs split the same documents
        skipped = [p for p in files if _utf8_error(p.read_bytes()) is not None]
        docs = [Document(p.relative_to(root).as_posix(), p) for p in files if p not in skipped]
        return _Found(docs, f"python-stdlib:{root}", skipped)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data path does not exist: {path}")
    if path.is_file():
        files, root = [path], path.parent
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                       and not EXCLUDED_DIRS.intersection(p.relative_to(path).parts) and _looks_textual(p))
        root = path
        if not files:
            raise ValueError(f"--data directory {path} contains no text files")
    docs: list[Document] = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        if f.suffix == ".jsonl":
            docs.extend(Document(f"{rel}:{i + 1}", f, i, off) for i, off in _jsonl_lines(f))
        else:
            docs.append(Document(rel, f))
    if all(f.stat().st_size == 0 for f in files):
        raise ValueError(f"--data {path} is empty")
    if not docs:
        raise ValueError(f"--data {path} has no documents: every JSONL line is blank")
    return _Found(docs, str(path.resolve()))


def discover(path: str | Path | None) -> tuple[list[Document], str]:
    """Documents of the data source, in a deterministic order, and a description of it.

    ``None``: the default corpus (its files that are not UTF-8 left out). A file: one document, or
    one per non-blank line of a ``.jsonl`` file (its ``text`` field). A directory: every text file
    below it (``*.txt``, ``*.md``, ``*.py``, ``*.jsonl`` and other files that are not binary), sorted
    by relative path.
    """
    found = _find(path)
    return found.docs, found.source


def _looks_textual(p: Path) -> bool:
    with open(p, "rb") as fh:
        return b"\0" not in fh.read(4096)


def _jsonl_lines(p: Path) -> list[tuple[int, int]]:
    """(line index, byte offset) of each non-blank line: a blank line is no document."""
    lines, pos = [], 0
    with open(p, "rb") as fh:
        for i, line in enumerate(fh):
            if line.strip():
                lines.append((i, pos))
            pos += len(line)
    return lines


def _utf8_error(data: bytes) -> int | None:
    """Offset of the first byte that is not valid UTF-8, None when all of ``data`` is."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start
    return None


@dataclass
class HeldOut:
    """A one-document source split inside the document: training text, then the validation tail."""

    train: Document
    val: Document
    size: int  # bytes of the whole document
    line: int  # 1-based line of the document on which the validation tail starts
    column: int  # byte of that line where it starts (0: at the start of the line)

    @property
    def val_bytes(self) -> int:
        return self.size - self.val.span[0]


def _tail_start(data: bytes, val_fraction: float) -> int | None:
    """Where the held-out tail starts: ``val_fraction`` of the bytes from the end, moved to the
    nearest line start within a quarter of the tail's length, else forward (or back) to the next
    UTF-8 character boundary, so both parts decode whenever the whole does. None: too short to cut."""
    n = len(data)
    if n < 2:
        return None
    tail = min(n - 1, max(1, round(n * val_fraction)))
    target = n - tail
    reach = tail // 4
    lo, hi = max(1, target - reach), min(n - 1, target + reach)
    # a line start p is a position after a newline: data[p - 1] == "\n"
    starts = [q + 1 for q in (data.rfind(b"\n", lo - 1, target), data.find(b"\n", target - 1, hi)) if q >= 0]
    if starts:
        return min(starts, key=lambda p: (abs(p - target), p))
    for step in (1, -1):
        cut = target
        while 0 < cut < n and 0x80 <= data[cut] < 0xC0:  # a UTF-8 continuation byte: not a boundary
            cut += step
        if 0 < cut < n:
            return cut
    return None


def hold_out_tail(doc: Document, val_fraction: float) -> HeldOut:
    """Splits one document: the validation part is its last ``val_fraction`` of bytes (cut at a line
    start when one is near, see :func:`_tail_start`), the training part everything before it.
    Deterministic: a function of the document's bytes and ``val_fraction`` only."""
    data = read_bytes(doc)
    cut = _tail_start(data, val_fraction)
    if cut is None:
        where = doc.path if doc.line is None else f"{doc.path} line {doc.line + 1}"
        raise ValueError(f"--data {where} is one document of {len(data)} byte(s): too small to split into "
                         f"training and validation text; give more text")
    line_start = data.rfind(b"\n", 0, cut) + 1
    return HeldOut(train=Document(doc.name, doc.path, doc.line, doc.offset, (0, cut)),
                   val=Document(doc.name, doc.path, doc.line, doc.offset, (cut, len(data))),
                   size=len(data), line=data.count(b"\n", 0, cut) + 1, column=cut - line_start)


def split(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Train and validation documents, by the stable hash of each document's name.

    One document is split inside itself (:func:`hold_out_tail`): no text is on both sides."""
    if len(docs) == 1:
        held = hold_out_tail(docs[0], val_fraction)
        return [held.train], [held.val]
    val = [d for d in docs if _stable_fraction(d.name) < val_fraction]
    train = [d for d in docs if _stable_fraction(d.name) >= val_fraction]
    if not train or not val:
        # tiny sources: keep at least one document on each side, deterministically
        ordered = sorted(docs, key=lambda d: _stable_fraction(d.name))
        val, train = ordered[:1], ordered[1:]
    return train, val


def read_bytes(doc: Document) -> bytes:
    if doc.line is None:
        with open(doc.path, "rb") as fh:
            if doc.span is None:
                return fh.read()
            fh.seek(doc.span[0])
            return fh.read(doc.span[1] - doc.span[0])
    with open(doc.path, "rb") as fh:
        fh.seek(doc.offset)
        raw = fh.readline()
    where = f"{doc.path} line {doc.line + 1}"
    bad = _utf8_error(raw)
    if bad is not None:  # json.loads would raise a UnicodeDecodeError that names no file
        raise ValueError(f"{where} is not valid UTF-8 (byte offset {doc.offset + bad} of the file); "
                         f"JSON Lines must be UTF-8")
    if not raw.strip():
        return b""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ValueError(f"{where} has no string 'text' field")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{where}: its 'text' holds a lone surrogate escape (character {err.start}), which "
                         f"UTF-8 cannot encode") from None
    return data if doc.span is None else data[doc.span[0]:doc.span[1]]


def read_text(doc: Document) -> str:
    data = read_bytes(doc)
    bad = _utf8_error(data)
    if bad is not None:
        offset = bad + (doc.span[0] if doc.span is not None and doc.line is None else 0)
        where = f"{doc.path} (byte offset {offset})" if doc.line is None else f"{doc.path} line {doc.line + 1}"
        raise ValueError(f"{where} is not valid UTF-8: a text tokenizer (BPE, tokenizer.json) needs UTF-8; "
                         f"only the byte tokenizer (--tokenizer byte) reads arbitrary bytes")
    return data.decode("utf-8")


def require_utf8(docs: list[Document]) -> None:
    """Raises, naming the file and the byte offset, unless every document decodes as UTF-8. Cheap next
    to tokenising (one read), so a text tokenizer checks the whole input before any work."""
    for d in docs:
        read_text(d)


def iter_texts(docs: list[Document]):
    """The documents' texts, for training a tokenizer; all of them are checked first (see
    :func:`require_utf8`), so a bad file fails at the call, before the tokenizer trains."""
    require_utf8(docs)
    return (read_text(d) for d in docs)


def tokenizer_texts(corpus: "Corpus"):
    """The training split's texts to fit a tokenizer on, after checking that the whole corpus
    (validation included) is UTF-8: a bad validation file fails before the tokenizer trains."""
    require_utf8(corpus.val_docs)
    return iter_texts(corpus.train_docs)


def _tokenize(docs: list[Document], tokenizer) -> np.ndarray:
    if tokenizer.kind == "byte":
        sep = DOC_SEPARATOR.encode()
        data = sep.join(read_bytes(d) for d in docs)
        return np.frombuffer(data, dtype=np.uint8).copy()
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    chunks = []
    batch: list[str] = []
    sep = [tokenizer.eot_id] if tokenizer.eot_id is not None else tokenizer.encode(DOC_SEPARATOR)

    def flush():
        for ids in tokenizer.encode_batch(batch):
            chunks.append(np.asarray(ids + sep, dtype=dtype))
        batch.clear()

    for d in docs:
        batch.append(read_text(d))
        if len(batch) == 64:
            flush()
    flush()
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)


def cache_dir() -> Path:
    return Path(os.environ.get("MOEKIT_CACHE", Path.home() / ".cache" / "moekit"))


def _cache_key(docs: list[Document], source: str, tokenizer, part: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([source, part, tokenizer.fingerprint()]).encode())
    seen: set[Path] = set()
    for d in docs:
        h.update(d.name.encode())
        if d.span is not None:  # the two halves of one document are two entries
            h.update(f"[{d.span[0]}:{d.span[1]}]".encode())
        if d.path not in seen:
            st = d.path.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            seen.add(d.path)
    return h.hexdigest()[:24]


def _cache_path(docs: list[Document], source: str, tokenizer, part: str) -> Path:
    return cache_dir() / "tokens" / f"{_cache_key(docs, source, tokenizer, part)}.npy"


def tokenized(docs: list[Document], source: str, tokenizer, part: str) -> np.ndarray:
    """The token array of ``docs``, from the cache when present (memory-mapped)."""
    path = _cache_path(docs, source, tokenizer, part)
    if path.is_file():
        try:
            return np.load(path, mmap_mode="r")
        except (ValueError, OSError):
            path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt, never trusted
    if tokenizer.kind != "byte":
        require_utf8(docs)  # a bad file fails before any tokenising, not partway through
    tokens = _tokenize(docs, tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as fh:
        np.save(fh, tokens)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(fh.name, path)
    return np.load(path, mmap_mode="r")


@dataclass
class Corpus:
    train_docs: list[Document]
    val_docs: list[Document]
    source: str
    val_fraction: float
    description: str = ""  # what was held out for validation, in words (for logs and run summaries)

    def docs(self, split: str) -> list[Document]:
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is invalid: allowed {', '.join(map(repr, SPLITS))}")
        return self.train_docs if split == "train" else self.val_docs


def _known_size(docs: list[Document]) -> int | None:
    """Bytes of ``docs`` plus one separator each: a bound on their tokens from above (a token is at
    least a byte), when known without reading them (None for JSONL lines)."""
    total = len(docs)
    for d in docs:
        if d.span is not None:
            total += d.span[1] - d.span[0]
        elif d.line is None:
            total += d.path.stat().st_size
        else:
            return None
    return total


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


def _note(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # once under torchrun, not once a process
        print(f"moekit: {message}", file=sys.stderr)


def open_corpus(path: str | Path | None, val_fraction: float = 0.02, seq_len: int | None = None) -> Corpus:
    """Discovers a source (see :func:`discover`) and splits it by document, or inside the document
    when there is only one (printing what was held out on stderr).

    ``seq_len``: refuse, naming the source, a split too short for one window of that many tokens
    (checked on byte counts, where they are known without reading the files)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: expected 0 < val_fraction < 1")
    found = _find(path)
    shown = "the default corpus" if path is None else f"--data {path}"
    if len(found.docs) == 1:
        doc = found.docs[0]
        held = hold_out_tail(doc, val_fraction)
        train, val = [held.train], [held.val]
        whole_file = path is not None and doc.path == Path(path) and doc.line is None
        what = f"{shown} is one document" if whole_file else f"{shown} holds one document ({doc.name})"
        start = f"line {held.line:,}" if held.column == 0 else f"byte {held.column:,} of line {held.line:,}"
        description = f"{what}: validating on its last {_percent(val_fraction)} ({held.val_bytes:,} bytes from {start})"
        _note(description)
    else:
        train, val = split(found.docs, val_fraction)
        description = (f"{shown}: {len(train):,} training and {len(val):,} validation documents "
                       f"(by a hash of each name, {_percent(val_fraction)} to validation)")
        if found.skipped:
            description += f"; {len(found.skipped)} file(s) that are not UTF-8 left out"
    if seq_len is not None:
        for part, docs, need in (("training", train, seq_len + 2), ("validation", val, seq_len + 1)):
            size = _known_size(docs)
            if size is not None and size < need:
                raise ValueError(f"{shown}: the {part} text has {size:,} bytes, fewer than one window of "
                                 f"seq_len={seq_len} needs ({need} tokens); give more text, a larger "
                                 f"val_fraction or a shorter --seq-len")
    return Corpus(train, val, found.source, val_fraction, description)


def load_split(corpus: Corpus, tokenizer, split: str) -> np.ndarray:
    """One split's token array (cached on disk, memory-mapped); only that split is read."""
    return tokenized(corpus.docs(split), corpus.source, tokenizer, f"{split}:{corpus.val_fraction}")


class TokenData:
    """The token arrays of a corpus's splits. A split :func:`load_tokens` did not load is tokenised
    (or read from the cache) on first access."""

    def __init__(self, corpus: Corpus, tokenizer, arrays: dict[str, np.ndarray] | None = None):
        self.corpus, self.tokenizer = corpus, tokenizer
        self._arrays = dict(arrays or {})

    def split(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = load_split(self.corpus, self.tokenizer, name)
        return self._arrays[name]

    @property
    def train(self) -> np.ndarray:
        return self.split("train")

    @property
    def val(self) -> np.ndarray:
        return self.split("val")


def load_tokens(corpus: Corpus, tokenizer, splits: tuple[str, ...] = SPLITS) -> TokenData:
    """Tokenised arrays of ``splits`` (cached on disk, memory-mapped); the others load on access.

    With a text tokenizer, every split to tokenise is checked for UTF-8 before any is tokenised."""
    missing = [s for s in splits if not _cache_path(corpus.docs(s), corpus.source, tokenizer,
                                                     f"{s}:{corpus.val_fraction}").is_file()]
    if tokenizer.kind != "byte":
        require_utf8([d for s in missing for d in corpus.docs(s)])
    return TokenData(corpus, tokenizer, {s: load_split(corpus, tokenizer, s) for s in splits})


def get_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int, micro: int = 0):
    """Random windows of ``seq_len + 1`` tokens; a pure function of (seed, step, micro)."""
    if len(tokens) < seq_len + 2:
        raise ValueError(f"the data has {len(tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}")
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)  # the last window ends at the last token
    window = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    t = torch.from_numpy(window)
    return t[:, :-1], t[:, 1:]


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_tokens: int):
    """Fixed, evenly spaced validation windows covering up to ``max_tokens`` target tokens."""
    n_windows = max(1, min(max_tokens // seq_len, (len(tokens) - 1) // seq_len))
    if len(tokens) < seq_len + 1:
        raise ValueError(f"the validation data has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    starts = np.linspace(0, len(tokens) - seq_len - 1, n_windows).astype(np.int64)
    for i in range(0, n_windows, batch_size):
        s = starts[i:i + batch_size]
        window = torch.from_numpy(np.asarray(tokens[s[:, None] + np.arange(seq_len + 1)], dtype=np.int64))
        yield window[:, :-1], window[:, 1:]
