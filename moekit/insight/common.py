"""What every insight tool shares: loading a model with its tokenizer and training options, the
evaluation text, and output directories that are never replaced silently.

Legend: B sequences, S tokens per sequence.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from moekit import checkpoint as ckpt_io
from moekit.model import MoETransformer
from moekit.train.data import Corpus, eval_batches, open_corpus, tokenized

# A directory any insight tool wrote holds this file; only such a directory (or a directory holding
# moekit checkpoints) may be replaced with ``overwrite``.
MARKER = "moekit-insight.json"


@dataclass
class LoadedModel:
    """A model ready for analysis, with what is known about how it was trained."""

    model: MoETransformer
    tokenizer: object  # ByteTokenizer | HFTokenizer
    checkpoint: Path | None  # the moekit checkpoint directory; None for a Hugging Face directory
    train_cfg: dict  # the run's TrainConfig as saved ({} when unknown)
    run_dir: Path | None  # the run directory holding metrics.jsonl, when there is one

    @property
    def metrics_path(self) -> Path | None:
        if self.run_dir is not None and (self.run_dir / "metrics.jsonl").is_file():
            return self.run_dir / "metrics.jsonl"
        return None


def is_hf_dir(path: Path) -> bool:
    """A Hugging Face model directory (config.json, no moekit manifest), not a moekit checkpoint."""
    cfg = path / "config.json"
    if not cfg.is_file() or (path / "manifest.json").is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return True  # from_pretrained reports the broken file by name
    return not ("model" in data and "format" in data)


def load_for_analysis(path: str | Path) -> LoadedModel:
    """A moekit checkpoint or run directory, or a Hugging Face model directory with a tokenizer.json.

    Raises :class:`moekit.checkpoint.CheckpointError` (a ValueError) or FileNotFoundError naming the
    path when something is missing."""
    from moekit.interop import from_pretrained
    from moekit.tokenizer import HFTokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path not found: {path}")
    if is_hf_dir(path):
        model = from_pretrained(path).eval()
        tok_path = path / "tokenizer.json"
        if not tok_path.is_file():
            raise FileNotFoundError(f"{tok_path} not found: the routing report needs the model's tokenizer")
        return LoadedModel(model, HFTokenizer.from_file(tok_path), None, {}, None)
    ckpt = ckpt_io.resolve(path)
    model, tokenizer, config = ckpt_io.load_model(ckpt)
    if tokenizer is None:
        raise ckpt_io.CheckpointError(f"{ckpt} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    return LoadedModel(model, tokenizer, ckpt, config.get("train") or {}, ckpt.parent)


def require_moe(model: MoETransformer, path: str | Path, what: str) -> None:
    if model.cfg.moe is None or not model.moe_layers:
        raise ValueError(f"{path} is a dense model (ModelConfig.moe=None): {what} needs a model with MoE layers")


def default_seq_len(loaded: LoadedModel, seq_len: int | None) -> int:
    """The run's training sequence length (else 256), at most the model's ``max_seq_len``."""
    max_len = loaded.model.cfg.max_seq_len
    if seq_len is None:
        return min(int(loaded.train_cfg.get("seq_len", 256)), max_len)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} is invalid: expected an integer >= 1")
    if seq_len > max_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={max_len}")
    return seq_len


def open_text(loaded: LoadedModel, data: str | None) -> Corpus:
    """``data`` when given, else the data the run was trained on (the default corpus when unknown),
    split by the run's own validation fraction."""
    source = data if data is not None else loaded.train_cfg.get("data")
    return open_corpus(source, loaded.train_cfg.get("val_fraction", 0.02))


def split_tokens(corpus: Corpus, tokenizer, split: str) -> np.ndarray:
    """One split's tokens, from the same on-disk cache entry :func:`moekit.train.data.load_tokens`
    uses (only the split asked for is tokenised)."""
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r} is invalid: allowed 'train', 'val'")
    docs = corpus.train_docs if split == "train" else corpus.val_docs
    return tokenized(docs, corpus.source, tokenizer, f"{split}:{corpus.val_fraction}")


def windows(tokens: np.ndarray, batch_size: int, seq_len: int, max_tokens: int) -> Iterator[torch.Tensor]:
    """Input ids [B, S] of the fixed, evenly spaced windows :func:`moekit.train.loop.evaluate` uses."""
    for x_BS, _ in eval_batches(tokens, batch_size, seq_len, max_tokens):
        yield x_BS


def is_python_corpus(corpus: Corpus) -> bool:
    """The default corpus (the standard library's source) or data made only of ``.py`` files."""
    docs = corpus.train_docs + corpus.val_docs
    return corpus.source.startswith("python-stdlib:") or (bool(docs) and all(d.path.suffix == ".py" for d in docs))


def prepare_out_dir(out: str | Path, overwrite: bool, what: str) -> Path:
    """Creates ``out``. An existing non-empty directory is an error unless ``overwrite`` is given, and
    even then only a directory an insight tool wrote (``moekit-insight.json``) or one holding
    moekit checkpoints is deleted, never anything else."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{what} output directory {out} already exists; choose another --out or pass "
                             f"--overwrite to replace it")
        if not ((out / MARKER).is_file() or ckpt_io.checkpoint_dirs(out)):
            raise ValueError(f"--overwrite refuses to delete {out}: it was not written by moekit (no {MARKER} "
                             f"or ckpt-* inside)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_marker(out: Path, tool: str, **info) -> None:
    """Marks ``out`` as written by ``tool`` (and records what it was made from)."""
    (out / MARKER).write_text(json.dumps({"tool": tool, **info}, indent=2, default=str) + "\n")


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
