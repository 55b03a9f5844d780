"""Starting a run from another checkpoint's weights: ``moekit train --init-from CKPT``.

    moekit upcycle --from runs/dense --experts 8 --top-k 2 --out runs/upcycled
    moekit train --init-from runs/upcycled --preset small --set moe.expert_hidden=1024 --out runs/moe-up

Unlike ``--resume`` (the same run, its optimizer, schedule position and RNG), ``--init-from`` begins a
new run: the model is built from ``--preset`` and ``--set`` as always, the checkpoint's weights are
loaded into it, and the optimizer and the schedule start fresh. The checkpoint's tokenizer is used.
Every tensor must have the same name and shape in both; this is checked on the meta device before
the run writes any file, and the error names each mismatch and the config fields that differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from moekit import checkpoint as ckpt_io
from moekit.config import ModelConfig
from moekit.model import MoETransformer


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k == "moe":
            out.update(_flat(v, "moe."))
        else:
            out[prefix + k] = v
    return out


def config_differences(saved: dict, mine: ModelConfig) -> list[str]:
    """``field=saved value (here: value)`` for every model field that differs (``moe.`` nested)."""
    mine_d = mine.to_dict()
    if (saved.get("moe") is None) != (mine_d.get("moe") is None):
        return ["moe=None (here: an MoE)" if saved.get("moe") is None else "moe=an MoE (here: None)"]
    a, b = _flat(saved), _flat(mine_d)
    return [f"{k}={a.get(k)!r} (here: {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_init_checkpoint(path: str | Path, config_for_vocab: Callable[[int], ModelConfig]) -> Path:
    """The verified checkpoint ``path`` names (or the newest of a run) after checking that its weights
    fit the model ``config_for_vocab(its vocab_size)`` builds; raises ValueError naming what differs."""
    ckpt = ckpt_io.resolve(Path(path))
    saved = ckpt_io.verify(ckpt)
    mcfg = config_for_vocab(int(saved["model"].get("vocab_size", 0)) or 1)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in MoETransformer(mcfg).state_dict().items()}
    weights = ckpt / "model.safetensors"
    try:
        with safe_open(str(weights), "pt") as fh:
            have = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (SafetensorError, OSError) as err:
        raise ckpt_io.CheckpointError(f"{weights} cannot be read: {err}") from None
    problems = [f"{k} has shape {list(have[k])} there, {list(want[k])} here" for k in sorted(set(have) & set(want))
                if have[k] != want[k]]
    problems += [f"{k} is missing there" for k in sorted(set(want) - set(have))]
    problems += [f"{k} is not in this model" for k in sorted(set(have) - set(want))]
    if problems:
        diff = config_differences(saved["model"], mcfg)
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        raise ValueError(f"--init-from {ckpt}: its weights do not fit the model built from the preset and --set: "
                         f"{'; '.join(problems[:6])}{more}. The checkpoint's model differs in: "
                         f"{', '.join(diff) or 'nothing in its config'}; build the same model with --preset/--set")
    return ckpt
