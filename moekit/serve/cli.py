"""``moekit serve``: the command line of the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import sys

from moekit.argtypes import POSITIVE, add_verb, int_at_least


def add_parser(sub) -> argparse.ArgumentParser:
    """Registers ``serve`` on the ``moekit`` sub-parsers."""
    p = add_verb(sub, "serve", "serve a model over an OpenAI-compatible HTTP API (continuous batching)", [
        "moekit serve --model runs/small",
        "moekit serve --model hf/Qwen3-30B-A3B --dtype bf16 --max-batch 16 --port 8080",
        "curl localhost:8000/v1/completions -H 'Content-Type: application/json' "
        "-d '{\"prompt\": \"def fib(n):\", \"max_tokens\": 32}'",
    ], description="Serve a model over the OpenAI API: POST /v1/completions and /v1/chat/completions (stream: true "
                   "for server-sent events),\nGET /v1/models, /health and /metrics (Prometheus). Requests join and "
                   "leave one running batch at token\nboundaries; each decode step runs every running request "
                   "through the model in one forward. SIGTERM or Ctrl-C\nlets the running requests finish, then "
                   "exits.")
    p.add_argument("--model", required=True, help="a checkpoint or run directory, or a Hugging Face model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int_at_least(0), default=8000, help="TCP port to listen on")
    p.add_argument("--max-batch", dest="max_batch", type=POSITIVE, default=8,
                   help="requests decoding at once (KV-cache slots of --context positions each); more wait")
    p.add_argument("--context", type=POSITIVE,
                   help="tokens of prompt + completion a request may hold, at most the model's max_seq_len; a "
                        "smaller one shrinks the KV cache (default: the model's max_seq_len)")
    p.add_argument("--prefill-chunk", dest="prefill_chunk", type=POSITIVE, default=256,
                   help="prompt tokens per prefill step (a long prompt delays running decodes one chunk at a time)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights and activations")
    p.add_argument("--model-name", dest="model_name",
                   help="the model id clients send (default: the model directory's name)")
    p.add_argument("--log-level", dest="log_level", choices=["critical", "error", "warning", "info", "debug"],
                   default="info", help="uvicorn's log level")
    p.set_defaults(fn=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    from moekit.serve.server import load_state, run_server

    state = load_state(args.model, args.dtype, args.max_batch, args.prefill_chunk, args.model_name, args.context)
    print(f"moekit: serving {state.model_name!r} on http://{args.host}:{args.port}/v1 "
          f"({args.max_batch} slots of {state.engine.max_len} tokens)", file=sys.stderr)
    run_server(state, args.host, args.port, args.log_level)
    return 0
