"""Continuous batching: requests join and leave one running decode batch at token boundaries.

Legend: N cache slots (the most requests decoding at once), B rows of a step, S new tokens of a row,
G key/value heads, L cache length (the context), Dk/Dv key/value head dims, V vocabulary.

One background thread runs the loop; each turn it

1. drops cancelled requests (a client that went away) and admits waiting ones into free slots (FIFO),
2. runs one prefill chunk of the oldest admitted request (its own forward, at most ``prefill_chunk``
   tokens, so a long prompt delays the running decodes by one chunk at a time),
3. runs one decode step over every decoding request: one forward of B rows of one token, so each MoE
   layer makes one expert pass for all of them.

Every slot owns a whole ``context`` row of the KV cache (:class:`SlotKVCache`): each request has its
own positions, counted from its own first token, so no request sees another's keys and a request's
greedy continuation is the one :func:`moekit.generate.generate` gives for its prompt alone. Admission
is by memory: a request waits until a slot (a row of the preallocated cache) is free; one whose prompt
plus ``max_tokens`` exceeds the context (the model's ``max_seq_len`` unless a smaller one is asked for,
which shrinks the pool) can never fit and is refused at submission.

NOTE: as in :func:`moekit.generate.generate`, a capacity factor or expert-choice routing makes a
token's experts depend on the other tokens of its forward pass: batched requests then continue
differently than alone. Dropless token-choice routing (the default) has no such coupling.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from moekit.generate import sample
from moekit.model import MoETransformer


class EngineClosed(RuntimeError):
    """The engine is draining or stopped and takes no new request."""


class SlotLayerKV:
    """One layer's keys and values for every slot, ``[N, G, L, D]``, allocated on first use."""

    def __init__(self, cache: "SlotKVCache"):
        self.cache = cache
        self.k_NGLD: torch.Tensor | None = None
        self.v_NGLD: torch.Tensor | None = None

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache
        if self.k_NGLD is None:
            self.k_NGLD = k_new.new_zeros(c.n_slots, k_new.shape[1], c.max_len, k_new.shape[-1])
            self.v_NGLD = v_new.new_zeros(c.n_slots, v_new.shape[1], c.max_len, v_new.shape[-1])
        if c.rows_B is not None:  # batched prefill: slot rows_B[b] writes its S positions at cols_BS[b]
            self.k_NGLD[c.rows_B[:, None], :, c.cols_BS] = k_new.transpose(1, 2)
            self.v_NGLD[c.rows_B[:, None], :, c.cols_BS] = v_new.transpose(1, 2)
            return (self.k_NGLD.index_select(0, c.rows_B)[:, :, :c.length],
                    self.v_NGLD.index_select(0, c.rows_B)[:, :, :c.length])
        if c.cols_B is None:  # prefill: one slot, S new positions from ``start``
            s, start, S = c.lo, c.start, k_new.shape[2]
            self.k_NGLD[s, :, start:start + S] = k_new[0]
            self.v_NGLD[s, :, start:start + S] = v_new[0]
            return self.k_NGLD[s:s + 1, :, :start + S], self.v_NGLD[s:s + 1, :, :start + S]
        # decode: slots lo .. lo+B-1, one new position each, at its own column
        rows_B = torch.arange(c.lo, c.lo + len(c.cols_B), device=k_new.device)
        self.k_NGLD[rows_B, :, c.cols_B] = k_new[:, :, 0]
        self.v_NGLD[rows_B, :, c.cols_B] = v_new[:, :, 0]
        hi = c.lo + len(c.cols_B)
        return self.k_NGLD[c.lo:hi, :, :c.length], self.v_NGLD[c.lo:hi, :, :c.length]


class SlotKVCache:
    """The KV-cache pool: ``n_slots`` rows of ``max_len`` positions per layer. Before each forward the
    engine says where it writes (:meth:`for_prefill` or :meth:`for_decode`)."""

    def __init__(self, n_layers: int, n_slots: int, max_len: int):
        self.n_slots, self.max_len = n_slots, max_len
        self.layers = [SlotLayerKV(self) for _ in range(n_layers)]
        self.lo, self.start, self.length = 0, 0, 0
        self.cols_B: torch.Tensor | None = None
        self.rows_B: torch.Tensor | None = None
        self.cols_BS: torch.Tensor | None = None

    def for_prefill(self, slot: int, start: int) -> None:
        self.lo, self.start, self.cols_B, self.rows_B = slot, start, None, None

    def for_decode(self, lo: int, cols_B: torch.Tensor) -> None:
        """Rows ``lo .. lo+B-1`` write at ``cols_B`` and attend to the first ``max(cols_B)+1`` positions."""
        self.lo, self.cols_B, self.length, self.rows_B = lo, cols_B, int(cols_B.max()) + 1, None

    def for_rows(self, rows_B: torch.Tensor, cols_BS: torch.Tensor) -> None:
        """Slots ``rows_B`` write at ``cols_BS`` and attend to the first ``max(cols_BS)+1`` positions."""
        self.rows_B, self.cols_BS, self.length = rows_B, cols_BS, int(cols_BS.max()) + 1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for lay in self.layers for t in (lay.k_NGLD, lay.v_NGLD)
                   if t is not None)


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} is invalid: an integer >= 1")
        if not 0 <= self.temperature:
            raise ValueError(f"temperature={self.temperature!r} is invalid: a number >= 0 (0 = greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} is invalid: a number in (0, 1]")


@dataclass
class Event:
    """What a request produced since its last event; ``finish_reason`` is set on the last one."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (stop token or string), "length", "cancelled", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]  # called from the engine thread
    id: int = 0
    cancelled: bool = False
    slot: int = -1
    cached: int = 0  # positions of this request in its slot's cache
    ids: list[int] = field(default_factory=list)  # generated ids (a stop token included)
    emitted: int = 0  # characters of the text already sent
    next_token: int = -1  # sampled, not yet in the cache
    generator: torch.Generator | None = None
    submitted: float = 0.0
    first_token_s: float | None = None
    full_text: str | None = None  # the text cut at a stop string, once one appeared

    def cancel(self) -> None:
        """Frees the request's slot at the next token boundary (safe from any thread)."""
        self.cancelled = True


def _stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that begins some stop string (held back while streaming)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best


@dataclass
class Metrics:
    """Counters the /metrics page shows (written by the engine thread, read by the server)."""

    requests_finished: collections.Counter = field(default_factory=collections.Counter)  # by finish reason
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    prefill_chunks: int = 0
    ttft_s: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))  # recent ones
    ttft_count: int = 0
    ttft_sum: float = 0.0
    expert_load: dict[int, torch.Tensor] = field(default_factory=dict)  # layer index -> [E] assignments


class Engine:
    """The continuous-batching loop around one model (see the module docstring).

    ``submit`` returns a :class:`Request` whose ``sink`` receives :class:`Event` s from the engine
    thread; ``close(drain=True)`` refuses new requests, finishes the running and waiting ones and stops.
    """

    def __init__(self, model: MoETransformer, tokenizer, max_batch: int = 8, prefill_chunk: int = 256,
                 stop_token_ids: tuple[int, ...] | None = None, context: int | None = None):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r} is invalid: an integer >= 1")
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk!r} is invalid: an integer >= 1")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        if context is not None and (not isinstance(context, int) or not 1 <= context <= model.cfg.max_seq_len):
            raise ValueError(f"context={context!r} is invalid: an integer in [1, the model's max_seq_len="
                             f"{model.cfg.max_seq_len}]")
        self.max_len = context or model.cfg.max_seq_len
        if stop_token_ids is None:
            eot = getattr(tokenizer, "eot_id", None)
            stop_token_ids = (eot,) if eot is not None else ()
        self.stop_token_ids = frozenset(stop_token_ids)
        self.device = model.embed.weight.device
        self.cache = SlotKVCache(len(model.layers), max_batch, self.max_len)
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: collections.deque[Request] = collections.deque()  # admitted, prompt not all cached
        self.metrics = Metrics()
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._accepting, self._stopping = True, False
        self._routed: dict[int, torch.Tensor] = {}  # layer index -> this forward's expert ids
        self._hooks = [blk.ffn.router.register_forward_hook(self._record_routing(blk.index))
                       for blk in model.layers if blk.is_moe and hasattr(blk.ffn, "router")]
        self._thread = threading.Thread(target=self._run, name="moekit-serve-engine", daemon=True)
        self._thread.start()

    # -- the server's side ---------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Event], None]) -> Request:
        if not prompt_ids:
            raise ValueError("the prompt is empty: it needs at least one token")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_len:
            raise ContextTooLong(f"the prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                                 f"{total} exceeds the context of {self.max_len} tokens")
        self.model.check_token_ids(torch.tensor(prompt_ids))
        req = Request(list(prompt_ids), params, sink, id=next(self._ids), submitted=time.perf_counter())
        if params.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        with self._cond:
            if not self._accepting:
                raise EngineClosed("the server is shutting down and takes no new request")
            self.waiting.append(req)
            self._cond.notify()
        return req

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.slots)

    def free_slots(self) -> int:
        return sum(r is None for r in self.slots)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops taking requests; with ``drain`` the queued and running ones finish first, otherwise they
        end with finish_reason "cancelled"."""
        with self._cond:
            self._accepting = False
            if not drain:
                for r in [*self.waiting, *(s for s in self.slots if s is not None)]:
                    r.cancelled = True
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        for h in self._hooks:
            h.remove()

    # -- the engine thread ---------------------------------------------------------------------------
    def _record_routing(self, index: int):
        def hook(_module, _args, out):
            ids = getattr(out, "expert_ids_TK", None)
            if ids is not None and threading.current_thread() is self._thread:  # (not another caller's forward)
                self._routed[index] = ids.detach()
        return hook

    def _run(self) -> None:
        with torch.no_grad():
            while True:
                with self._cond:
                    while not self._stopping and not self.waiting and self.running == 0:
                        self._cond.wait()
                    self._drop_cancelled()
                    if self._stopping and not self.waiting and self.running == 0:
                        return
                    self._admit()
                try:
                    if self.prefilling:
                        self._prefill_step()
                    if any(r is not None and r.next_token >= 0 for r in self.slots):
                        self._decode_step()
                except Exception as err:  # noqa: BLE001 - a failed forward ends its requests, not the server
                    self._fail_all(f"{type(err).__name__}: {err}")

    def _drop_cancelled(self) -> None:
        for r in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(r)
            self._finish(r, "cancelled")
        for r in self.slots:
            if r is not None and r.cancelled:
                self._finish(r, "cancelled")

    def _admit(self) -> None:
        while self.waiting and None in self.slots:
            r = self.waiting.popleft()
            r.slot = self.slots.index(None)  # the lowest free slot keeps the decode rows together
            r.cached = 0
            self.slots[r.slot] = r
            self.prefilling.append(r)

    def _finish(self, r: Request, reason: str, error: str | None = None, last: list[int] = ()) -> None:
        if r.slot >= 0 and self.slots[r.slot] is r:
            self.slots[r.slot] = None
        if r in self.prefilling:
            self.prefilling.remove(r)
        r.slot = -1
        self.metrics.requests_finished[reason] += 1
        text = self._text(r)
        try:
            r.sink(Event(text[r.emitted:] if reason in ("stop", "length") else "", list(last), reason,
                         len(r.prompt_ids), len(r.ids), error))
        except Exception:  # noqa: BLE001 - a sink whose consumer is gone
            pass

    def _fail_all(self, message: str) -> None:
        for r in [s for s in self.slots if s is not None]:
            self._finish(r, "error", message)

    def _forward(self, ids_BS: torch.Tensor, positions_BS: torch.Tensor, mask, real_BS,
                 last_B: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, V] at each row's ``last_B`` position (default: the last); the cache has been told
        where to write."""
        model = self.model
        self._routed.clear()
        x = model.embed_tokens(ids_BS)
        cos, sin = model.rope(positions_BS, x.dtype)
        for blk, layer_cache in zip(model.layers, self.cache.layers):
            x, _ = blk(x, cos[:, None], sin[:, None], layer_cache, mask, real_BS)
        self._count_experts(real_BS, ids_BS.numel())
        x_BD = x[:, -1] if last_B is None else x[torch.arange(x.shape[0], device=x.device), last_B]
        return model.head(x_BD)

    def _count_experts(self, real_BS, n_tokens: int) -> None:
        load = self.metrics.expert_load
        for index, ids_TK in self._routed.items():
            if real_BS is not None and ids_TK.shape[0] == n_tokens:  # padding rows were routed too
                ids_TK = ids_TK[real_BS.reshape(-1)]
            counts = torch.bincount(ids_TK.reshape(-1).long().cpu(), minlength=self.model.cfg.moe.num_routed)
            load[index] = counts if index not in load else _add_padded(load[index], counts)

    def _prefill_step(self) -> None:
        """The next chunk of the admitted prompts in one forward, as many prompts as fit in
        ``prefill_chunk`` tokens (padding counted); a prompt alone goes as generate's prefill does."""
        batch, width = [], 0
        for r in self.prefilling:
            n = min(len(r.prompt_ids) - r.cached, self.prefill_chunk)
            if batch and (len(batch) + 1) * max(width, n) > self.prefill_chunk:
                break
            batch.append(r)
            width = max(width, n)
        if len(batch) == 1:
            return self._prefill_chunk(batch[0])
        # several prompts, right-padded to ``width``: each row keeps its own positions (from its ``cached``),
        # its padding writes past its real columns (overwritten before they are attended) and routes no expert
        B, dev = len(batch), self.device
        ids_BS = torch.zeros(B, width, dtype=torch.long)
        n_B = torch.tensor([min(len(r.prompt_ids) - r.cached, self.prefill_chunk) for r in batch])
        for b, r in enumerate(batch):
            ids_BS[b, :n_B[b]] = torch.tensor(r.prompt_ids[r.cached:r.cached + int(n_B[b])])
        start_B = torch.tensor([r.cached for r in batch])
        positions_BS = start_B[:, None] + torch.arange(width)[None]
        cols_BS = positions_BS.clamp(max=self.max_len - 1)
        real_BS = torch.arange(width)[None] < n_B[:, None]
        self.cache.for_rows(torch.tensor([r.slot for r in batch], device=dev), cols_BS.to(dev))
        allowed_B1SL = (torch.arange(self.cache.length)[None, None] <= positions_BS[:, :, None])[:, None]
        logits_BV = self._forward(ids_BS.to(dev), positions_BS.to(dev), allowed_B1SL.to(dev), real_BS.to(dev),
                                  (n_B - 1).to(dev))
        self.metrics.prefill_chunks += 1
        for b, r in enumerate(batch):
            r.cached += int(n_B[b])
            if r.cached == len(r.prompt_ids):
                self.prefilling.remove(r)
                self.metrics.prompt_tokens += len(r.prompt_ids)
                self._take(r, logits_BV[b:b + 1])

    def _prefill_chunk(self, r: Request) -> None:
        start = r.cached
        end = min(len(r.prompt_ids), start + self.prefill_chunk)
        ids_1S = torch.tensor([r.prompt_ids[start:end]], device=self.device)
        positions_1S = torch.arange(start, end, device=self.device)[None]
        # the first chunk attends plainly causally (as generate's prefill); later ones also see the cache
        mask = None if start == 0 else (torch.arange(end, device=self.device)[None]
                                        <= positions_1S[0, :, None])[None, None]
        self.cache.for_prefill(r.slot, start)
        logits_1V = self._forward(ids_1S, positions_1S, mask, None)
        r.cached = end
        self.metrics.prefill_chunks += 1
        if end < len(r.prompt_ids):
            return
        self.prefilling.remove(r)
        self.metrics.prompt_tokens += len(r.prompt_ids)
        self._take(r, logits_1V)

    def _decode_step(self) -> None:
        rows = [i for i, r in enumerate(self.slots) if r is not None and r.next_token >= 0]
        lo, hi = rows[0], rows[-1] + 1
        B = hi - lo
        # rows in lo..hi that are not decoding (free, or still prefilling) ride along as padding: they
        # write at their next free column (overwritten before it is ever attended) and route no expert
        members = [self.slots[i] for i in range(lo, hi)]
        active = [r is not None and r.next_token >= 0 for r in members]
        cols = [r.cached if r is not None else 0 for r in members]
        cols = [min(c, self.max_len - 1) for c in cols]
        ids_B1 = torch.tensor([[r.next_token if a else 0] for r, a in zip(members, active)], device=self.device)
        cols_B = torch.tensor(cols, device=self.device)
        real_B1 = torch.tensor(active, device=self.device)[:, None]
        self.cache.for_decode(lo, cols_B)
        allowed_B11L = (torch.arange(self.cache.length, device=self.device)[None] <= cols_B[:, None])[:, None, None]
        logits_BV = self._forward(ids_B1, cols_B[:, None], allowed_B11L, None if all(active) else real_B1)
        self.metrics.decode_steps += 1
        for b, (r, a) in enumerate(zip(members, active)):
            if a:
                r.cached += 1
                self._take(r, logits_BV[b:b + 1])

    def _take(self, r: Request, logits_1V: torch.Tensor) -> None:
        """Samples the request's next token, sends its new text, and ends it at a stop or its length."""
        p = r.params
        tok = int(sample(logits_1V, p.temperature, None, p.top_p, r.generator)[0])
        now = time.perf_counter()
        m = self.metrics
        if r.first_token_s is None:
            r.first_token_s = now - r.submitted
            m.ttft_s.append(r.first_token_s)
            m.ttft_count += 1
            m.ttft_sum += r.first_token_s
        r.ids.append(tok)
        m.generated_tokens += 1
        if tok in self.stop_token_ids:
            return self._finish(r, "stop", last=[tok])
        text = self._text(r)
        cut = min((i for i in (text.find(s, max(0, r.emitted - len(s))) for s in p.stop) if i >= 0), default=-1)
        if cut >= 0:
            r.full_text = text[:cut]
            return self._finish(r, "stop", last=[tok])
        if len(r.ids) >= p.max_tokens:
            return self._finish(r, "length", last=[tok])
        r.next_token = tok
        safe = len(text) - _stop_prefix(text, p.stop)
        if text.endswith("\ufffd"):  # a character split over tokens: wait for its last byte
            safe = min(safe, len(text) - 1)
        if safe > r.emitted:
            piece, r.emitted = text[r.emitted:safe], safe
            r.sink(Event(piece, [tok]))
        else:
            r.sink(Event("", [tok]))

    def _text(self, r: Request) -> str:
        if r.full_text is not None:
            return r.full_text
        ids = [t for t in r.ids if t not in self.stop_token_ids]
        return self.tokenizer.decode(ids)


class ContextTooLong(ValueError):
    """The prompt plus max_tokens exceeds the model's context: the request can never fit."""


def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = max(len(a), len(b))
    out = torch.zeros(n, dtype=torch.long)
    out[:len(a)] += a
    out[:len(b)] += b
    return out
