"""Tokenizers: byte-level (no training), byte-level BPE trained with the ``tokenizers`` library, or
an existing ``tokenizer.json``.

A tokenizer is saved with every run and checkpoint: ``tokenizer.json`` for BPE/loaded ones, a
one-line ``tokenizer_config.json`` for the byte tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator

END_OF_TEXT = "<|endoftext|>"


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, every byte sequence round-trips."""

    kind = "byte"
    vocab_size = 256
    eot_id = None  # documents are separated by a newline byte instead

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "byte"

    def save(self, directory: Path) -> None:
        (Path(directory) / "tokenizer_config.json").write_text(json.dumps({"type": "byte"}) + "\n")

    def to_hf(self) -> "HFTokenizer":
        """The same tokenizer as a ``tokenizers`` tokenizer.json, for transformers users: a byte-level
        BPE whose vocabulary is the 256 bytes (id = byte value, GPT-2's printable stand-in characters)
        with no merges, so it encodes and decodes exactly as this class does (invalid UTF-8 decodes
        to U+FFFD in both)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(_byte_chars())}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        return HFTokenizer(tok)


def _byte_chars() -> list[str]:
    """GPT-2's printable character for each byte (the alphabet of ``tokenizers``' ByteLevel)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (BPE trained here, or any ``tokenizer.json``)."""

    kind = "hf"

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eot_id = tok.token_to_id(END_OF_TEXT)

    @classmethod
    def from_file(cls, path: str | Path) -> "HFTokenizer":
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as err:  # the library raises a bare Exception for malformed JSON
            raise ValueError(f"{path} is not a valid tokenizer.json: {err}") from None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]

    def is_byte_tokenizer(self) -> bool:
        """Whether this is exactly :meth:`ByteTokenizer.to_hf` (as ``moekit convert --to-hf`` writes it)."""
        return json.loads(self.tok.to_str()) == json.loads(ByteTokenizer().to_hf().tok.to_str())

    def save(self, directory: Path) -> None:
        self.tok.save(str(Path(directory) / "tokenizer.json"))


def train_bpe(texts: Iterator[str], vocab_size: int) -> HFTokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"--vocab-size={vocab_size!r} is invalid: a byte-level BPE needs at least 257 tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok)


def load_tokenizer(directory: str | Path) -> ByteTokenizer | HFTokenizer:
    """The tokenizer saved in a run or checkpoint directory."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return HFTokenizer.from_file(directory / "tokenizer.json")
    cfg = directory / "tokenizer_config.json"
    if cfg.is_file():
        try:
            kind = json.loads(cfg.read_text()).get("type")
        except json.JSONDecodeError as err:
            raise ValueError(f"{cfg} is not valid JSON: {err}") from None
        if kind == "byte":
            return ByteTokenizer()
        raise ValueError(f"{cfg}: unknown tokenizer type {kind!r}; known: 'byte'")
    raise FileNotFoundError(f"no tokenizer.json or tokenizer_config.json in {directory}")
