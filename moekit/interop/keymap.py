"""Declarative checkpoint key maps and a lazy, memory-mapped safetensors reader.

A key map lists, for every moekit parameter (names with ``{layer}`` and ``{expert}`` templates),
where its tensor comes from in a Hugging Face checkpoint: one source key, several concatenated
along dim 0 (gate and up projections fused), or one per expert stacked into [E, ...].
Every source key must be consumed and every moekit tensor filled with the right shape; anything
else is reported by name.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from moekit.checkpoint import CheckpointError, plain_name, refuse_pickle


class InteropError(ValueError):
    """A checkpoint that cannot be read or does not fit; the message names the file or keys."""


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _data_offsets(path: Path) -> tuple[int, dict]:
    """Where each tensor's bytes start in a safetensors file (8-byte header size, JSON header, data);
    safetensors itself has already validated the file when this runs."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


class SafetensorsDir:
    """Every tensor of a Hugging Face directory (one file, or shards with their index), opened lazily.

    Tensors are read with plain file reads straight into their destination (:meth:`read_rows`), not
    through a memory map: mapped pages would count in the process's memory until the file is closed,
    doubling the loading peak; read ones live in the page cache, which the kernel may drop."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise InteropError(f"{index} is not a valid safetensors index: {err}") from None
            try:
                files = sorted({plain_name(v, index) for v in weight_map.values()})
            except CheckpointError as err:
                raise InteropError(str(err)) from None
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            weight_map = None
        if not files:
            refuse_pickle(self.directory)
            raise InteropError(f"no *.safetensors weights in {self.directory}")
        self._handles = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise InteropError(f"shard {path} named in the index is missing")
            try:
                self._handles[name] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise InteropError(f"{path} cannot be read: {err}") from None
        self.where = weight_map or {k: name for name, h in self._handles.items() for k in h.keys()}
        self._offsets: dict[str, tuple[int, dict]] = {}
        self._files: dict[str, Any] = {}  # shard name -> an open binary file, for read_rows

    def read_rows(self, key: str, start: int, dst: torch.Tensor) -> None:
        """Rows ``start .. start + len(dst)`` along dim 0 of ``key`` into ``dst`` (same shape per row;
        converted when the dtypes differ)."""
        name = self.where[key]
        path = self.directory / name
        if name not in self._offsets:
            self._offsets[name] = _data_offsets(path)
            self._files[name] = open(path, "rb")  # noqa: SIM115 - kept open for every tensor of the shard
        base, header = self._offsets[name]
        entry = header.get(key)
        dtype = _DTYPES.get(entry["dtype"]) if entry else None
        if dtype is None or not dst.is_contiguous():
            dst.copy_(self.get(key)[start:start + dst.shape[0]])  # unusual dtypes: through safetensors
            return
        row_bytes = dst[0].numel() * dtype.itemsize if dst.shape[0] else 0
        begin = base + entry["data_offsets"][0] + start * row_bytes
        target = dst if dst.dtype == dtype else torch.empty(dst.shape, dtype=dtype)
        f = self._files[name]
        f.seek(begin)
        view = memoryview(target.view(-1).view(torch.uint8).numpy())
        if f.readinto(view) != len(view):
            raise InteropError(f"{path}: {key} is truncated")
        if target is not dst:
            dst.copy_(target)

    def keys(self) -> set[str]:
        return set(self.where)

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self.where[key]].get_tensor(key)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "SafetensorsDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self.where[key]].get_slice(key).get_shape())


@dataclass
class Rule:
    """moekit ``target`` <- ``sources`` (concatenated on dim 0), per expert stacked when ``experts``.

    Expert tensors come either one key per expert (``{expert}`` in the source name) or, with
    ``stacked``, one key holding every expert along dim 0 ([E·rows, …], DBRX). ``transpose``: each
    source piece is the transpose of moekit's layout (DBRX's down projection is [F, D] per expert).
    """

    target: str
    sources: list[str]
    experts: bool = False
    optional: bool = False  # absent from some checkpoints of the family (the target keeps its default)
    stacked: bool = False
    transpose: bool = False
    leading_one: bool = False  # the checkpoint adds a leading dim of size 1 (ERNIE's [1, E] selection bias)


@dataclass
class Split:
    """One checkpoint tensor cut along dim 0 into several moekit ``targets`` (DBRX's fused Wqkv)."""

    targets: list[str]
    source: str


@dataclass
class KeyMap:
    per_layer: list[Rule | Split] = field(default_factory=list)
    global_: list[Rule | Split] = field(default_factory=list)
    # keys of layers past the decoder's (``model.layers.{i}.`` with i >= n_layers): multi-token-prediction
    # modules (GLM-4.5, dots.llm1) that do not enter the next-token logits and are skipped, as transformers does
    skip_layers_after: bool = False
    skip_containing: tuple[str, ...] = ()  # checkpoint keys with any of these in their name are skipped (MTP modules)


# ---- rules shared by the Llama-style families -----------------------------------------------------
HF_LAYER = "model.layers.{layer}"
LLAMA_GLOBAL = [Rule("embed.weight", ["model.embed_tokens.weight"]), Rule("norm.weight", ["model.norm.weight"]),
                Rule("lm_head.weight", ["lm_head.weight"])]
LLAMA_NORMS = [Rule("layers.{layer}.attn_norm.weight", [f"{HF_LAYER}.input_layernorm.weight"]),
               Rule("layers.{layer}.ffn_norm.weight", [f"{HF_LAYER}.post_attention_layernorm.weight"])]


def swiglu_rules(target: str, source: str, experts: bool = False) -> list[Rule]:
    """A gate/up/down SwiGLU MLP (``{source}.gate_proj`` …) into moekit's fused ``in`` and ``out``
    projections; ``experts``: per expert (``{source}`` holds ``{expert}``) into stacked weights."""
    gate_up = [f"{source}.gate_proj.weight", f"{source}.up_proj.weight"]
    if experts:
        return [Rule(f"{target}.w_in", gate_up, experts=True),
                Rule(f"{target}.w_out", [f"{source}.down_proj.weight"], experts=True)]
    return [Rule(f"{target}.in_proj.weight", gate_up),
            Rule(f"{target}.down_proj.weight", [f"{source}.down_proj.weight"])]


def load_with_keymap(model: torch.nn.Module, ckpt: SafetensorsDir, keymap: KeyMap, layer_is_moe: list[bool],
                     num_experts: int, dtype: torch.dtype | None = None, progress: bool = False) -> None:
    """Fills ``model`` (possibly on the meta device) from ``ckpt`` following ``keymap``; ``progress``: a bar
    over the layers on stderr."""
    params = dict(model.state_dict())
    filled: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    problems: list[str] = []

    def piece_shape(name: str, rule: Rule) -> tuple[int, ...]:
        shape = ckpt.shape(name)
        if rule.leading_one and shape[:1] == (1,):
            shape = shape[1:]
        if rule.stacked:
            if shape[0] % num_experts:
                problems.append(f"{name}: {shape[0]} rows do not split into {num_experts} experts")
            shape = (shape[0] // num_experts, *shape[1:])
        return shape[::-1] if rule.transpose else shape

    def read_piece(name: str, rule: Rule, e: int, dst: torch.Tensor) -> None:
        used.add(name)
        rows = dst.shape[1] if rule.transpose else dst.shape[0]
        start = e * rows if rule.stacked else 0
        if rule.transpose:  # read in the file's layout, then transpose into place
            tmp = torch.empty((dst.shape[1], dst.shape[0], *dst.shape[2:]), dtype=dst.dtype)
            ckpt.read_rows(name, start, tmp)
            dst.copy_(tmp.t())
        else:
            ckpt.read_rows(name, start, dst)

    def apply_split(rule: Split, fmt: dict) -> None:
        targets = [t.format(**fmt) for t in rule.targets]
        if not all(t in params for t in targets):
            return
        name = rule.source.format(**fmt)
        if name not in ckpt.where:
            problems.append(f"missing key {name}")
            return
        shape, rows = ckpt.shape(name), [params[t].shape for t in targets]
        if shape[0] != sum(r[0] for r in rows) or any(tuple(r[1:]) != shape[1:] for r in rows):
            problems.append(f"shape mismatch for {name}: checkpoint {shape} vs moekit {', '.join(targets)} "
                            f"{[tuple(r) for r in rows]} stacked on dim 0")
            return
        used.add(name)
        offset = 0
        for t, r in zip(targets, rows):
            filled[t] = torch.empty(tuple(r), dtype=dtype or params[t].dtype)
            ckpt.read_rows(name, offset, filled[t])
            offset += r[0]

    def apply(rule: Rule | Split, fmt: dict) -> None:
        if isinstance(rule, Split):
            return apply_split(rule, fmt)
        target = rule.target.format(**fmt)
        if target not in params:
            return  # the rule is for a layer kind this layer is not (e.g. a dense FFN in an MoE layer)
        if rule.optional and any(src.format(expert=0, **fmt) not in ckpt.where for src in rule.sources):
            return
        expected = tuple(params[target].shape)
        per_expert_keys = rule.experts and not rule.stacked
        names = [[s.format(expert=e, **fmt) for s in rule.sources] for e in range(num_experts if rule.experts else 1)]
        for row in names[:1] if rule.stacked else names:
            for name in row:
                if name not in ckpt.where:
                    problems.append(f"missing key {name}")
                    return
        # Shapes from the headers first, then one preallocated tensor filled part by part: no
        # concatenated or stacked temporaries, so loading peaks near the model's own size.
        part_rows = [[piece_shape(n, rule) for n in row] for row in (names if per_expert_keys else names[:1])]
        row_shape = (sum(p[0] for p in part_rows[0]), *part_rows[0][0][1:])
        got = (len(names), *row_shape) if rule.experts else row_shape
        if got != expected or any(p[1:] != part_rows[0][0][1:] for row in part_rows for p in row) or \
                any(row != part_rows[0] for row in part_rows):
            problems.append(f"shape mismatch for {target}: checkpoint {got} vs model {expected} "
                            f"(from {', '.join(s.format(expert='*', **fmt) for s in rule.sources)})")
            return
        tensor = torch.empty(expected, dtype=dtype or params[target].dtype)
        for e, row in enumerate(names):
            dst = tensor[e] if rule.experts else tensor
            offset = 0
            for name, shape in zip(row, part_rows[e if per_expert_keys else 0]):
                read_piece(name, rule, e, dst[offset:offset + shape[0]])
                offset += shape[0]
        filled[target] = tensor

    for rule in keymap.global_:
        apply(rule, {})
    from tqdm import tqdm

    for i in tqdm(range(len(layer_is_moe)), desc="reading layers", unit="layer", disable=not progress, leave=False,
                  dynamic_ncols=True, file=sys.stderr):
        for rule in keymap.per_layer:
            apply(rule, {"layer": i})
    unexpected = sorted(ckpt.keys() - used)
    unexpected = [k for k in unexpected if not any(part in k for part in keymap.skip_containing)]
    if keymap.skip_layers_after:
        n = len(layer_is_moe)
        unexpected = [k for k in unexpected if not (k.startswith("model.layers.") and
                                                    k.split(".")[2].isdigit() and int(k.split(".")[2]) >= n)]
    missing = sorted(k for k in params if k not in filled and not _is_buffer_with_default(k))
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}")
    if missing:
        problems.append(f"moekit tensors not filled {missing[:8]}{' …' if len(missing) > 8 else ''}")
    if problems:
        raise InteropError(f"{ckpt.directory}: " + "; ".join(problems))
    model.load_state_dict(filled, strict=False, assign=True)


def _is_buffer_with_default(name: str) -> bool:
    # routers' aux-loss-free state: zeros unless the checkpoint carries a bias (mapped explicitly)
    return name.endswith(("router.expert_bias", "router.load_since_update"))


def export_with_keymap(model: torch.nn.Module, keymap: KeyMap, num_experts: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`load_with_keymap`: moekit tensors split and unstacked into checkpoint keys.
    Concatenated sources are equal-sized along dim 0 (gate and up projections)."""
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def emit(rule: Rule | Split, fmt: dict) -> None:
        if isinstance(rule, Split):
            targets = [t.format(**fmt) for t in rule.targets]
            if all(t in state for t in targets):
                used.update(targets)
                out[rule.source.format(**fmt)] = torch.cat([state[t].detach().cpu() for t in targets]).contiguous()
            return
        target = rule.target.format(**fmt)
        if target not in state:
            return
        used.add(target)
        tensor = state[target].detach().cpu()
        if rule.leading_one:
            tensor = tensor[None]
        if not rule.experts:
            for src, part in zip(rule.sources, tensor.chunk(len(rule.sources), dim=0)):
                out[src.format(**fmt)] = part.contiguous()
            return
        pieces: dict[str, list[torch.Tensor]] = {}
        for e in range(num_experts):
            for src, part in zip(rule.sources, tensor[e].chunk(len(rule.sources), dim=0)):
                pieces.setdefault(src.format(expert=e, **fmt), []).append(part.t() if rule.transpose else part)
        for name, parts in pieces.items():  # stacked sources collect every expert under one name
            out[name] = torch.cat(parts).contiguous()

    for rule in keymap.global_:
        emit(rule, {})
    n_layers = len(getattr(model, "layers", []))
    for i in range(n_layers):
        for rule in keymap.per_layer:
            emit(rule, {"layer": i})
    left = sorted(k for k in state if k not in used and not _is_buffer_with_default(k))
    if left:
        raise InteropError(f"these moekit tensors have no place in the target format: {left[:8]}")
    return out


def unmapped_selection_bias(model: torch.nn.Module, keymap: KeyMap) -> str | None:
    """Why an export would change the logits by dropping a router's aux-loss-free selection bias
    (the family has no tensor for it and it is not zero); None when nothing is lost.

    NOTE: the bias picks the experts, so dropping a non-zero one changes the routing. The load
    counted since the last bias update (``load_since_update``) is training state and may go."""
    n_layers = len(getattr(model, "layers", []))
    mapped = {r.target.format(layer=i) for r in keymap.per_layer if isinstance(r, Rule) for i in range(n_layers)}
    biased = {k: v for k, v in model.state_dict().items()
              if k.endswith("router.expert_bias") and k not in mapped and v.any()}
    if not biased:
        return None
    worst = max(v.abs().max().item() for v in biased.values())
    return (f"expert_bias: {len(biased)} router(s) hold a non-zero aux-loss-free selection bias ({next(iter(biased))}, "
            f"max |b| = {worst:.3g}) with no tensor for it in the target format (only DeepSeek-V3 has one, "
            "e_score_correction_bias); it changes which experts are chosen")
