"""Lexical classes of the tokens of Python source, in context: which experts take indentation,
identifiers, digits, keywords, punctuation.

A window of token ids is turned back into its bytes; every byte gets a class by a few regular
expressions over the whole window (so the ``d`` of ``def`` is a keyword byte and the ``d`` of
``add`` an identifier byte), and a token takes the class most of its bytes have (whitespace counts
only for a token made of whitespace alone). NOTE: lexical only: words inside strings and comments
are classed as identifiers and keywords, and a window that starts inside a line takes that line's
first whitespace as indentation.
"""

from __future__ import annotations

import json
import keyword
import re
import string

import numpy as np

CATEGORIES = ("indentation", "whitespace", "keyword", "identifier", "digits", "punctuation", "other")
INDENT, SPACE, KEYWORD, IDENT, DIGITS, PUNCT, OTHER = range(len(CATEGORIES))

_KEYWORDS = frozenset(k.encode() for k in keyword.kwlist)
_NUMBER = re.compile(rb"(?<![A-Za-z0-9_])[0-9][0-9A-Za-z_]*")  # 42, 0x1F, 1_000, 3e5 (not x1 in names)
_NAME = re.compile(rb"(?<![A-Za-z0-9_])[A-Za-z_][A-Za-z0-9_]*")
_INDENT = re.compile(rb"(?m)^[ \t]+")
_WHITESPACE_BYTES = np.zeros(256, dtype=bool)
_WHITESPACE_BYTES[list(b" \t\r\n\f\v")] = True
_PUNCT_BYTES = np.zeros(256, dtype=bool)
_PUNCT_BYTES[list(string.punctuation.encode())] = True


def classify_bytes(data: bytes) -> np.ndarray:
    """The class (an index into :data:`CATEGORIES`) of every byte of ``data``."""
    arr = np.frombuffer(data, dtype=np.uint8)
    cls = np.full(len(data), OTHER, dtype=np.int64)
    cls[_PUNCT_BYTES[arr]] = PUNCT
    cls[_WHITESPACE_BYTES[arr]] = SPACE
    for m in _INDENT.finditer(data):
        cls[m.start():m.end()] = INDENT
    for m in _NUMBER.finditer(data):
        cls[m.start():m.end()] = DIGITS
    for m in _NAME.finditer(data):
        cls[m.start():m.end()] = KEYWORD if m.group() in _KEYWORDS else IDENT
    return cls


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes each token id stands for (index = id)."""
    if tokenizer.kind == "byte":
        return [bytes([i]) for i in range(256)]
    tok = tokenizer.tok
    decoder = (json.loads(tok.to_str()).get("decoder") or {}).get("type")
    if decoder == "ByteLevel":  # GPT-2 byte-level BPE: each character of a token stands for one byte
        char_to_byte = _byte_level_chars()
        out = []
        for i in range(tokenizer.vocab_size):
            piece = tok.id_to_token(i) or ""
            if all(c in char_to_byte for c in piece):
                out.append(bytes(char_to_byte[c] for c in piece))
            else:  # an added special token, e.g. <|endoftext|>
                out.append(piece.encode("utf-8"))
        return out
    return [tokenizer.decode([i]).encode("utf-8") for i in range(tokenizer.vocab_size)]


def _byte_level_chars() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode``: printable bytes stand for themselves, the others,
    in byte order, for the characters 256, 257, ..."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | \
        set(range(ord("®"), ord("ÿ") + 1))
    chars, shifted = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


def classify_tokens(ids: list[int] | np.ndarray, pieces: list[bytes]) -> np.ndarray:
    """The class of every token of one window of ids, in the context of the whole window."""
    ids = [int(i) for i in ids]
    parts = [pieces[i] for i in ids]
    lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    cls = classify_bytes(b"".join(parts))
    if len(cls) == len(ids):  # one byte a token (the byte tokenizer): the bytes' classes
        return cls
    out = np.full(len(ids), OTHER, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(ids) else lengths
    for t, (s, n) in enumerate(zip(starts, lengths)):
        if n == 0:
            continue
        counts = np.bincount(cls[s:s + n], minlength=len(CATEGORIES))
        blank = counts[INDENT] + counts[SPACE]
        if blank == n:  # whitespace alone: indentation if any of it is
            out[t] = INDENT if counts[INDENT] else SPACE
        else:
            counts[INDENT] = counts[SPACE] = 0
            out[t] = int(np.argmax(counts))
    return out
