"""Rotary settings between transformers' configs and moekit's ``rope_theta`` / ``rope_scaling``.

transformers 5 writes ``rope_parameters`` ({"rope_type", "rope_theta", "factor", ...}); older configs
write ``rope_theta`` at the top and ``rope_scaling`` ({"type" or "rope_type", "factor", ...}).
"""

from __future__ import annotations

from moekit.nn.rope import SCALING_KEYS

# transformers' key -> moekit's key, for the scaling options moekit implements
_KEYS = {"factor": "factor", "original_max_position_embeddings": "original_max_seq_len", "beta_fast": "beta_fast",
         "beta_slow": "beta_slow", "mscale": "mscale", "mscale_all_dim": "mscale_all_dim",
         "attention_factor": "attention_factor", "truncate": "truncate"}
_IGNORED = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def rope_settings(hf: dict, max_seq_len: int, partial_rotary: bool = False) -> dict:
    """``rope_theta`` and ``rope_scaling`` keyword arguments for :class:`moekit.ModelConfig`, and
    ``partial_rotary_factor`` for a family that rotates part of each head (``partial_rotary``; it may
    sit in ``rope_parameters`` or at the top of the config).

    Raises ValueError naming the field for a rope type or option moekit does not implement."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    kind = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    extra = {"partial_rotary_factor": float(partial)} if partial_rotary else {}
    if partial != 1.0 and not partial_rotary:
        raise ValueError(f"rope partial_rotary_factor={partial!r} is not supported for this family (only 1.0)")
    if kind == "default":
        return {"rope_theta": theta, "rope_scaling": None, **extra}
    if kind not in SCALING_KEYS:
        raise ValueError(f"rope_type={kind!r} is not supported (supported: 'default', "
                         f"{', '.join(repr(k) for k in SCALING_KEYS)})")
    unknown = sorted(k for k in params if k not in _IGNORED and _KEYS.get(k) not in SCALING_KEYS[kind])
    if unknown:
        raise ValueError(f"rope option(s) {unknown} are not supported for rope_type={kind!r}")
    scaling = {"type": kind, **{_KEYS[k]: v for k, v in params.items() if k in _KEYS and v is not None}}
    if kind == "yarn" and scaling.get("factor") is None and "original_max_seq_len" in scaling:
        scaling["factor"] = max_seq_len / scaling["original_max_seq_len"]  # transformers' fallback
    return {"rope_theta": theta, "rope_scaling": scaling, **extra}


def hf_rope_parameters(cfg, partial_rotary: bool = False) -> dict:
    """transformers' ``rope_parameters`` for a moekit config; with ``partial_rotary`` (a family that
    reads it) the ``partial_rotary_factor`` too. Without, a factor other than 1 reads back as 1 and the
    export is refused naming it."""
    extra = {"partial_rotary_factor": cfg.partial_rotary_factor} if partial_rotary else {}
    rs = cfg.rope_scaling
    if rs is None:
        return {"rope_theta": cfg.rope_theta, "rope_type": "default", **extra}
    back = {v: k for k, v in _KEYS.items()}
    return {"rope_theta": cfg.rope_theta, "rope_type": rs["type"],
            **{back[k]: v for k, v in rs.items() if k != "type"}, **extra}
