"""Loading a model for serving and running the HTTP server (uvicorn).

    moekit serve --model runs/small --port 8000
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from moekit.interop import load_model_and_tokenizer
from moekit.serve.app import ServerState, build_app
from moekit.serve.engine import Engine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
log = logging.getLogger("moekit.serve")


def chat_template_of(model_dir: Path) -> tuple[str | None, str, str]:
    """(chat template, bos token, eos token) from a Hugging Face ``tokenizer_config.json`` beside the
    model; (None, "", "") when there is none (moekit's own checkpoints have no template)."""
    path = Path(model_dir) / "tokenizer_config.json"
    if not path.is_file():
        return None, "", ""
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None

    def token(name):
        t = cfg.get(name) or ""
        return t.get("content", "") if isinstance(t, dict) else str(t)

    template = cfg.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return (template if isinstance(template, str) else None), token("bos_token"), token("eos_token")


def stop_token_ids(model_dir: Path, tokenizer, eos: str = "") -> tuple[int, ...]:
    """The tokens that end a text: the tokenizer's end-of-text token, the ``eos_token`` of a Hugging Face
    tokenizer_config.json and the ``eos_token_id`` (one or a list) of its generation_config.json."""
    ids = set()
    if getattr(tokenizer, "eot_id", None) is not None:
        ids.add(tokenizer.eot_id)
    eos_ids = tokenizer.encode(eos) if eos else []
    if len(eos_ids) == 1:  # (a special token encodes as itself)
        ids.add(eos_ids[0])
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        try:
            value = json.loads(gen.read_text()).get("eos_token_id")
        except json.JSONDecodeError as err:
            raise ValueError(f"{gen} is not valid JSON: {err}") from None
        ids.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    return tuple(sorted(ids))


def load_state(model_dir: str | Path, dtype: str = "fp32", max_batch: int = 8, prefill_chunk: int = 256,
               model_name: str | None = None, context: int | None = None) -> ServerState:
    """A model directory (moekit checkpoint or run, or Hugging Face) with its tokenizer, behind an engine."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid; allowed: {', '.join(DTYPES)}")
    path = Path(model_dir)
    model, tokenizer = load_model_and_tokenizer(path, "serve")
    model = model.to(DTYPES[dtype]).eval()
    template, bos, eos = chat_template_of(path)
    engine = Engine(model, tokenizer, max_batch=max_batch, prefill_chunk=prefill_chunk,
                    stop_token_ids=stop_token_ids(path, tokenizer, eos), context=context)
    return ServerState(engine, model_name or path.resolve().name, template, bos, eos)


def run_server(state: ServerState, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serves until SIGINT/SIGTERM; uvicorn then stops accepting connections and lets the open ones finish,
    and the engine drains what is left before the process exits."""
    import uvicorn

    app = build_app(state, on_shutdown=lambda: state.engine.close(drain=True))
    uvicorn.run(app, host=host, port=port, log_level=log_level)
