"""Training text: the embedded default corpus, user data, tokenisation with an on-disk cache, batches.

The default corpus is the Python standard library's source of the running interpreter (every
``*.py`` under ``sysconfig.get_paths()["stdlib"]``, site-packages excluded: about 30 MB of real code,
comments and docstrings on any machine with Python). Files are read in sorted order of their
relative path and split into train and validation *by file*: a file is validation when the first
8 bytes of sha256(relative path) read as an integer fall in the lowest ``val_fraction`` of the
range, so the split never changes with the machine or the file order.

Tokens are cached as ``.npy`` arrays under ``$MOEKIT_CACHE`` (default ``~/.cache/moekit``), keyed by
the file list (paths, sizes, mtimes), the split and the tokenizer, and memory-mapped on load: a
second run starts at once.

Batches are stateless: batch (step, micro) draws its window starts from a generator seeded by
(seed, step, micro), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DOC_SEPARATOR = "\n"
EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass
class Document:
    name: str  # relative path (or "file.jsonl:line")
    path: Path
    line: int | None = None  # JSONL line number (0-based), else None
    offset: int = 0  # JSONL: byte offset of the line


def _stable_fraction(name: str) -> float:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def default_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def discover(path: str | Path | None) -> tuple[list[Document], str]:
    """Documents of the data source, in a deterministic order, and a description of it.

    ``None``: the default corpus. A file: one document, or one per line of a ``.jsonl`` file (its
    ``text`` field). A directory: every text file below it (``*.txt``, ``*.md``, ``*.py``, ``*.jsonl``
    and other files that are not binary), sorted by relative path.
    """
    if path is None:
        root = default_corpus_root()
        files = sorted(p for p in root.rglob("*.py") if p.is_file()
                       and not EXCLUDED_DIRS.intersection(p.relative_to(root).parts))
        if not files:
            raise FileNotFoundError(f"the default corpus (Python's standard library) has no .py files under {root}")
        return [Document(p.relative_to(root).as_posix(), p) for p in files], f"python-stdlib:{root}"
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
            docs.extend(Document(f"{rel}:{i + 1}", f, i, off) for i, off in enumerate(_line_offsets(f)))
        else:
            docs.append(Document(rel, f))
    if all(f.stat().st_size == 0 for f in files):
        raise ValueError(f"--data {path} is empty")
    return docs, str(path.resolve())


def _looks_textual(p: Path) -> bool:
    with open(p, "rb") as fh:
        return b"\0" not in fh.read(4096)


def _line_offsets(p: Path) -> list[int]:
    offsets, pos = [], 0
    with open(p, "rb") as fh:
        for line in fh:
            offsets.append(pos)
            pos += len(line)
    return offsets


def split(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Train and validation documents, by the stable hash of each document's name."""
    val = [d for d in docs if _stable_fraction(d.name) < val_fraction]
    train = [d for d in docs if _stable_fraction(d.name) >= val_fraction]
    if not train or not val:
        # tiny sources: keep at least one document on each side, deterministically
        ordered = sorted(docs, key=lambda d: _stable_fraction(d.name))
        if len(ordered) < 2:
            return ordered, ordered
        val, train = ordered[:1], ordered[1:]
    return train, val


def read_bytes(doc: Document) -> bytes:
    if doc.line is None:
        return doc.path.read_bytes()
    with open(doc.path, "rb") as fh:
        fh.seek(doc.offset)
        line = fh.readline().strip()
    if not line:
        return b""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{doc.path} line {doc.line + 1} is not valid JSON: {err}") from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ValueError(f"{doc.path} line {doc.line + 1} has no string 'text' field")
    return text.encode("utf-8")


def read_text(doc: Document) -> str:
    data = read_bytes(doc)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{doc.path} is not valid UTF-8 (byte {err.start}); only the byte tokenizer "
                         f"(--tokenizer byte) reads arbitrary bytes") from None


def iter_texts(docs: list[Document]):
    for d in docs:
        yield read_text(d)


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
        if d.path not in seen:
            st = d.path.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            seen.add(d.path)
    return h.hexdigest()[:24]


def tokenized(docs: list[Document], source: str, tokenizer, part: str) -> np.ndarray:
    """The token array of ``docs``, from the cache when present (memory-mapped)."""
    path = cache_dir() / "tokens" / f"{_cache_key(docs, source, tokenizer, part)}.npy"
    if path.is_file():
        try:
            return np.load(path, mmap_mode="r")
        except (ValueError, OSError):
            path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt, never trusted
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


def open_corpus(path: str | Path | None, val_fraction: float = 0.02) -> Corpus:
    """Discovers a source (see :func:`discover`) and splits it by file."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: expected 0 < val_fraction < 1")
    docs, source = discover(path)
    train, val = split(docs, val_fraction)
    return Corpus(train, val, source, val_fraction)


@dataclass
class TokenData:
    train: np.ndarray
    val: np.ndarray


def load_tokens(corpus: Corpus, tokenizer) -> TokenData:
    """Tokenised train and validation arrays (cached on disk, memory-mapped)."""
    tag = f":{corpus.val_fraction}"
    return TokenData(tokenized(corpus.train_docs, corpus.source, tokenizer, "train" + tag),
                     tokenized(corpus.val_docs, corpus.source, tokenizer, "val" + tag))


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
