"""Crash-safe checkpoints: safetensors weights, JSON config, optimizer/RNG state, checksums.

A checkpoint is a directory ``ckpt-XXXXXXXX`` (the step, zero-padded) holding

    model.safetensors   weights and persistent buffers (the routers' selection bias included)
    config.json         {"model": ModelConfig, "train": TrainConfig or null, "format": 1}
    trainer.safetensors optimizer state tensors and the torch RNG state (training checkpoints)
    state.json          step, tokens, elapsed time, optimizer hyper-parameters
    tokenizer.json / tokenizer_config.json
    manifest.json       size and sha256 of every file above

It is written into a hidden temporary directory, every file fsync'ed, then renamed into place in
one atomic step, so a directory named ``ckpt-*`` is always complete; the manifest proves it on
load. Nothing goes through pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moekit.config import ModelConfig

FORMAT = 1
PREFIX = "ckpt-"


class CheckpointError(ValueError):
    """A missing, incomplete or corrupt checkpoint; the message names the path."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / "manifest.json").is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, model_cfg: ModelConfig, tokenizer,
                    train_cfg: dict | None = None, optimizer: torch.optim.Optimizer | None = None,
                    state: dict | None = None, keep_last: int | None = None,
                    model_state: dict | None = None, optimizer_state: dict | None = None,
                    extra_json: dict[str, Any] | None = None) -> Path:
    """Writes ``run_dir/ckpt-{step}`` atomically and keeps the newest ``keep_last`` checkpoints.

    ``model_state`` / ``optimizer_state`` replace ``model.state_dict()`` / ``optimizer.state_dict()``
    (expert parallelism passes the states with the experts gathered whole). ``extra_json``: file name ->
    data, more JSON files in the checkpoint (in the manifest like the rest; ``quant.json``)."""
    run_dir = Path(run_dir)
    final = run_dir / f"{PREFIX}{step:08d}"
    tmp = run_dir / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    weights = {k: v.detach().contiguous().cpu() for k, v in (model_state or model.state_dict()).items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": str(FORMAT)})
    _write_json(tmp / "config.json", {"format": FORMAT, "model": model_cfg.to_dict(), "train": train_cfg})
    for name, data in (extra_json or {}).items():
        _write_json(tmp / plain_name(name, tmp), data)
    if tokenizer is not None:
        tokenizer.save(tmp)
    if optimizer is not None:
        tensors, opt_meta = _flatten_optimizer(optimizer_state or optimizer.state_dict())
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "trainer.safetensors"))
        _write_json(tmp / "state.json", {**(state or {}), "step": step, "optimizer": opt_meta})

    manifest = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
    _write_json(tmp / "manifest.json", manifest)
    for p in tmp.iterdir():
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    # Re-saving the same step (e.g. a signal right after a periodic save): the previous copy stays
    # whole, out of the listing, until the new one is in place.
    old = _set_aside(final) if final.exists() else None
    os.rename(tmp, final)
    _fsync_dir(run_dir)
    if old is not None:
        shutil.rmtree(old)

    if keep_last:
        for stale in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(_set_aside(stale))
    return final


def _set_aside(ckpt: Path) -> Path:
    """Renames a checkpoint out of the listing in one atomic step, so that deleting it can be killed at
    any moment: the checkpoint is whole or gone, and :func:`clean_partial` removes what is left."""
    aside = ckpt.parent / f".old-{ckpt.name}-{os.getpid()}"
    os.rename(ckpt, aside)
    return aside


def clean_partial(run_dir: Path) -> None:
    """Removes temporary directories a killed save left behind (never a complete checkpoint)."""
    for pattern in (f".tmp-{PREFIX}*", f".old-{PREFIX}*"):
        for p in Path(run_dir).glob(pattern):
            shutil.rmtree(p, ignore_errors=True)


def verify(ckpt: Path) -> dict:
    """Checks every file against the manifest; returns the parsed config.json."""
    ckpt = Path(ckpt)
    manifest_path = ckpt / "manifest.json"
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt}")
    if not manifest_path.is_file():
        raise CheckpointError(f"{ckpt} is not a moekit checkpoint (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_path} is corrupt: {err}") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{manifest_path} is corrupt: expected a JSON object")
    for name, entry in manifest.items():
        path = ckpt / plain_name(name, manifest_path)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in the manifest)")
        if path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path} is corrupt: its size or checksum differs from the manifest")
    try:
        config = json.loads((ckpt / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{ckpt / 'config.json'} cannot be read: {err}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{ckpt / 'config.json'} is not a moekit checkpoint config (format {FORMAT})")
    return config


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def _is_pickle(path: Path) -> bool:
    if path.suffix in PICKLE_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:1] == b"\x80" or head == b"PK\x03\x04"  # a raw pickle, or torch.save's zip of pickles


def refuse_pickle(path: Path) -> None:
    """Raises CheckpointError for a pickle-based checkpoint file (or a directory holding one): moekit
    never unpickles, since loading a pickle runs whatever code it names."""
    path = Path(path)
    found = [path] if path.is_file() and _is_pickle(path) else \
        sorted(p for p in path.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES) if path.is_dir() else []
    if found:
        raise CheckpointError(f"{found[0]} is a pickle-based checkpoint; moekit never unpickles files (a pickle can "
                              f"run arbitrary code). Convert it to safetensors (e.g. transformers' "
                              f"save_pretrained(..., safe_serialization=True)) and pass that directory")


def plain_name(name: str, where: Path) -> str:
    """``name`` if it is a plain file name (no directory part): files named by a manifest or an index
    stay inside their directory."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise CheckpointError(f"{where}: {name!r} is not a plain file name; refusing a path outside the directory")
    return name


def resolve(path: Path) -> Path:
    """A checkpoint directory itself, or the newest checkpoint of a run directory."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        if not path.exists():
            raise CheckpointError(f"model path not found: {path}")
        refuse_pickle(path)
        raise CheckpointError(f"{path} is not a moekit checkpoint or run directory (no ckpt-* inside)")
    return latest


def load_weights(ckpt: Path, model: torch.nn.Module, assign: bool = False) -> None:
    """``ckpt``'s weights into ``model``; ``assign``: the file's tensors replace the model's (a model built
    on the meta device)."""
    path = Path(ckpt) / "model.safetensors"
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} cannot be read: {err}") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=assign)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit the model: {err}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


QUANT_FILE = "quant.json"  # a weight-only quantized checkpoint's QuantConfig (moekit.quant.save_quantized)


def _load_quantized(ckpt: Path, model_cfg: ModelConfig) -> torch.nn.Module:
    """The quantized model of a verified checkpoint: built on the meta device in its quantized form,
    then the file's tensors assigned, so memory holds the quantized weights only."""
    from moekit.model import MoETransformer
    from moekit.quant.config import QuantConfig
    from moekit.quant.model import quantized_skeleton

    path = ckpt / QUANT_FILE
    try:
        qcfg = QuantConfig.from_dict(json.loads(path.read_text())["quant"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} is not a moekit quantization config: {err}") from None
    with torch.device("meta"):
        model = MoETransformer(model_cfg)
    quantized_skeleton(model, qcfg)
    load_weights(ckpt, model, assign=True)  # every tensor, or CheckpointError naming the file
    return model


def load_model(path: Path, dtype: torch.dtype | None = None):
    """(model, tokenizer, config dict) of a checkpoint or run directory, verified first."""
    from moekit.model import MoETransformer
    from moekit.tokenizer import load_tokenizer

    ckpt = resolve(path)
    config = verify(ckpt)
    try:
        model_cfg = ModelConfig.from_dict(config["model"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{ckpt / 'config.json'}: invalid model config: {err}") from None
    if (ckpt / QUANT_FILE).is_file():  # weight-only quantized (moekit.quant.save_quantized)
        model = _load_quantized(ckpt, model_cfg)
    else:
        model = MoETransformer(model_cfg)
        load_weights(ckpt, model)
    if dtype is not None:
        model = model.to(dtype)
    has_tokenizer = (ckpt / "tokenizer.json").is_file() or (ckpt / "tokenizer_config.json").is_file()
    return model.eval(), load_tokenizer(ckpt) if has_tokenizer else None, config


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_trainer_state(ckpt: Path, optimizer: torch.optim.Optimizer, slices: dict[int, slice] | None = None) -> dict:
    """Restores the optimizer and the torch RNG; returns state.json. ``slices``: parameter index ->
    the rows of the saved (whole) state this process keeps (its experts under expert parallelism)."""
    ckpt = Path(ckpt)
    try:
        state = json.loads((ckpt / "state.json").read_text())
        state["optimizer"]["param_groups"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{ckpt / 'state.json'} is not a training state: {err!r}") from None
    path = ckpt / "trainer.safetensors"
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} cannot be read: {err}") from None
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            if slices and int(idx) in slices and value.dim():
                value = value[slices[int(idx)]].clone()
            per_param.setdefault(int(idx), {})[name] = value
    for idx, extra in state["optimizer"]["scalars"].items():
        per_param.setdefault(int(idx), {}).update(extra)
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: optimizer state does not fit this model: {err}") from None
    torch.set_rng_state(tensors["rng.torch"])
    return state
