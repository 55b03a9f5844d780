"""The training loop: ``moekit train``.

    moekit train --preset small --steps 600 --out runs/small        # byte-level stdlib text
    moekit train --out runs/small --resume                          # continue after any interruption

AdamW with decoupled weight decay (none on norms, biases, embeddings by default), linear warmup then
cosine decay to ``min_lr_ratio`` · lr, gradient clipping and accumulation, optional bf16 autocast and
``torch.compile``; the MoE aux losses are part of the loss; the aux-loss-free bias update runs once
per optimizer step. A run interrupted at any point (SIGINT, SIGTERM, SIGKILL) and resumed ends
with exactly the weights and losses of an uninterrupted run on the CPU: batches are a pure function
of (seed, step), and checkpoints carry the optimizer state and the RNG.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from moekit import checkpoint as ckpt_io
from moekit.dist import ParallelDims, init_distributed
from moekit.dist.ep import (clip_grad_norm, data_parallel, expert_slices, full_optimizer_state, full_state_dict,
                            shard_experts, sync_expert_grads)
from moekit.config import ModelConfig, apply_overrides, check_field_types
from moekit.model import MoETransformer, flops_per_token
from moekit.moe.layer import update_expert_biases
from moekit.presets import get_preset, miniature
from moekit.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe
from moekit.train.data import eval_batches, get_batch, load_tokens, open_corpus, tokenizer_texts
from moekit.train.metrics import MetricsLog, collapsed_experts, layer_metrics
from moekit.train.warmstart import check_init_checkpoint
from moekit.validate import FLAG, bad, check_choice, check_float, check_int


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides the model; validated at construction."""

    preset: str = "small"
    miniature: bool = False  # a CPU-sized sibling of the preset (moekit.presets.miniature)
    data: str | None = None  # None: the embedded default corpus; a path is stored absolute (absolute_paths)
    out: str = "runs/train"
    tokenizer: str = "byte"  # "byte", "bpe", or a path to a tokenizer.json
    vocab_size: int = 4096  # BPE only
    val_fraction: float = 0.02
    steps: int = 600
    batch_size: int = 16  # sequences per micro-batch, over all processes (each takes an equal share)
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int | None = None  # linear warmup steps; None: min(50, steps // 10)
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "fp32"  # "fp32" or "bf16" (autocast)
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    compile: bool = False
    eval_every: int = 100
    eval_tokens: int = 65536
    log_every: int = 10
    save_every: int = 200
    keep_last: int = 2
    seed: int = 0
    model_overrides: dict | None = None  # ModelConfig fields replaced on the preset ({"moe": {...}} nests)
    skip_nonfinite: bool = False  # skip (and count) steps whose loss or gradient is not finite, instead of stopping
    ep: int = 1  # expert-parallel degree (under torchrun; divides the process count and the expert count)
    init_from: str | None = None  # start from this checkpoint's weights, fresh optimizer (moekit.train.warmstart)
    router_lr_mult: float = 1.0  # the routers' learning rate is lr x this (their own optimizer param group)

    def __post_init__(self) -> None:
        check_field_types(self)  # e.g. lr=True or miniature="false" from a hand-edited train_config.json
        # the errors name the command-line flags (--batch-size=0 is invalid: ...)
        for f in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "log_every", "save_every",
                  "keep_last", "eval_tokens", "ep"):
            check_int(FLAG, f, getattr(self, f), 1)
        if self.warmup is None:
            object.__setattr__(self, "warmup", min(50, self.steps // 10))
        check_int(FLAG, "warmup", self.warmup, 0)
        check_float(FLAG, "lr", self.lr, above=True)
        for f in ("beta1", "beta2"):
            check_float(FLAG, f, getattr(self, f), 0, 1, above=True, below=True)
        check_float(FLAG, "min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_float(FLAG, "router_lr_mult", self.router_lr_mult, above=True)
        for f in ("weight_decay", "grad_clip"):
            check_float(FLAG, f, getattr(self, f))
        check_int(FLAG, "seed", self.seed, 0)
        check_choice(FLAG, "dtype", self.dtype, ("fp32", "bf16"))
        for f in self.PATH_FIELDS:
            if getattr(self, f) == "":
                raise bad(FLAG, f, "", "expected a path (an empty one would mean the current directory)")
        # the saved config is read by eval, inspect, prune and --resume from any directory
        for f, value in self.absolute_paths({f: getattr(self, f) for f in self.PATH_FIELDS}).items():
            object.__setattr__(self, f, value)
        get_preset(self.preset)  # unknown preset: a clear error listing the known ones

    PATH_FIELDS = ("data", "tokenizer", "init_from")  # a class constant, not a field

    @staticmethod
    def absolute_paths(fields: dict[str, Any]) -> dict[str, Any]:
        """``fields`` (TrainConfig fields, e.g. a saved config) with each path absolute and resolved
        against the current directory: ``data``, ``init_from``, and ``tokenizer`` unless 'byte' or
        'bpe'. Idempotent; resolve a saved config through it before comparing it with a new one."""
        out = dict(fields)
        for f in TrainConfig.PATH_FIELDS:
            value = out.get(f)
            if isinstance(value, str) and value and not (f == "tokenizer" and value in ("byte", "bpe")):
                out[f] = str(Path(value).expanduser().resolve())
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from lr to min_lr_ratio · lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - 1 - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def param_groups(model: MoETransformer, cfg: TrainConfig) -> list[dict]:
    """Weight decay on matrices only: never on norms or biases, on embeddings when configured.

    With ``router_lr_mult`` != 1 the routers' parameters (gate weights, noise weights) form a third
    group whose ``lr_mult`` scales the scheduled learning rate, weight decay as the other matrices
    (a lower router learning rate is the field's advice for routing stability). At 1 there are two
    groups, as in checkpoints written before the option."""
    from moekit.moe.routers import Router

    router_ids = set()
    if cfg.router_lr_mult != 1.0:
        router_ids = {id(p) for m in model.modules() if isinstance(m, Router) for p in m.parameters()}
    decay, no_decay, router = [], [], []
    embed_ids = {id(model.embed.weight)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in router_ids:
            router.append(p)
        elif p.dim() < 2 or (id(p) in embed_ids and not cfg.decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if router:
        groups.append({"params": router, "weight_decay": cfg.weight_decay, "lr_mult": cfg.router_lr_mult})
    return groups


def model_config_for(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    base = miniature(cfg.preset) if cfg.miniature else get_preset(cfg.preset)
    mcfg = apply_overrides(base, cfg.model_overrides).replace(vocab_size=vocab_size)
    if cfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"--seq-len={cfg.seq_len} exceeds the model's positions: preset {cfg.preset!r} has "
                         f"max_seq_len={mcfg.max_seq_len}")
    return mcfg


def _build_tokenizer(cfg: TrainConfig, corpus):
    if cfg.init_from is not None:  # the tokenizer the initial weights were trained with
        ckpt = ckpt_io.resolve(Path(cfg.init_from))
        if (ckpt / "tokenizer.json").is_file() or (ckpt / "tokenizer_config.json").is_file():
            return load_tokenizer(ckpt)
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "bpe":
        return train_bpe(tokenizer_texts(corpus), cfg.vocab_size)
    return HFTokenizer.from_file(cfg.tokenizer)


TRAIN_BYTES_PER_PARAMETER = 16  # fp32 weight and gradient, AdamW's two moments (bf16 autocast keeps them fp32)


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup v2 limit; None if unknown."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            avail = min(avail if avail is not None else 1 << 62, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def check_memory(mcfg: ModelConfig, cfg: TrainConfig, device: torch.device) -> None:
    """Refuses, with the figures, a model whose weights, gradients and optimizer state alone exceed
    the memory available on ``device`` (counted on the meta device: nothing is allocated to find out;
    activations come on top, so passing is no promise)."""
    from moekit.model import count_parameters

    n = count_parameters(mcfg).total
    if device.type == "cuda":
        avail, where = torch.cuda.mem_get_info(device)[0], f"free on {device}"
    else:
        avail, where = available_memory(), "available"
    need = n * TRAIN_BYTES_PER_PARAMETER
    if avail is not None and need > avail:
        hint = "" if cfg.miniature else "; --miniature trains a CPU-sized sibling of the same architecture"
        raise ValueError(f"preset {cfg.preset!r} has {n:,} parameters: training needs at least "
                         f"{need / 2**30:,.1f} GiB for weights, gradients and AdamW state "
                         f"({TRAIN_BYTES_PER_PARAMETER} bytes a parameter), and {avail / 2**30:,.1f} GiB is "
                         f"{where}{hint}")


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> bool:
    """True when resuming from a checkpoint. Never deletes a run without ``overwrite``."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    has_content = out.is_dir() and any(out.iterdir())
    if resume:
        if ckpt_io.latest_checkpoint(out) is None:
            if not (out / "train_config.json").is_file():
                raise ValueError(f"--resume: no checkpoint in {out} to resume from")
            # stopped before its first checkpoint: the run starts again, with its saved options
            print(f"moekit: {out} has no checkpoint yet; starting it again from step 0", file=sys.stderr)
            shutil.rmtree(out)
            out.mkdir(parents=True)
            return False
        ckpt_io.clean_partial(out)
        return True
    if has_content:
        if not overwrite:
            raise ValueError(f"run directory {out} already exists; pass --resume to continue it or "
                             f"--overwrite to replace it")
        is_run = (out / "train_config.json").is_file() or ckpt_io.checkpoint_dirs(out)
        if not is_run:
            raise ValueError(f"--overwrite refuses to delete {out}: it is not a moekit run directory "
                             f"(no train_config.json or ckpt-* inside)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return False


# Options a resumed run may change. --steps reshapes the cosine schedule from the resume point on (and
# --ep / --device change the rounding), so such a run is no longer bit-identical to an uninterrupted one.
RESUMABLE = ("out", "steps", "ep", "skip_nonfinite", "eval_every", "log_every", "save_every", "keep_last", "device")


def _has_nonfinite(obj) -> bool:
    """A module output (a tensor, a tuple of them, MoEOutput or ModelOutput) holding NaN or inf."""
    if isinstance(obj, (tuple, list)):
        return any(_has_nonfinite(o) for o in obj)
    if not torch.is_tensor(obj):
        obj = getattr(obj, "output", getattr(obj, "logits", None))
    return torch.is_tensor(obj) and obj.is_floating_point() and not bool(torch.isfinite(obj).all())


@torch.no_grad()
def first_nonfinite(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, autocast_dtype=None) -> str:
    """Where a non-finite loss first appears: a non-finite parameter, else the first module (in the
    order forward finishes them, innermost first) whose output is not finite on this batch, else the
    gradients. Runs one extra forward pass; called only after a non-finite step."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            return f"parameter {name}"
    found: list[str] = []

    def hook_for(name: str):
        def hook(module, args, output):
            if not found and _has_nonfinite(output):
                found.append(f"{name} ({type(module).__name__} output)")
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules() if n]
    try:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast_dtype is not None):
            model(x, targets=y)
    finally:
        for h in handles:
            h.remove()
    if found:
        return found[0]
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    return f"gradient of {bad[0]}" if bad else "the loss only"


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_loss: float | None  # the cross-entropy of the last step run
    val_loss: float | None  # the last validation loss, measured after step ``val_step``
    interrupted: bool
    val_step: int | None = None
    exit_code: int = 0  # 128 + the signal that stopped the run (130: SIGINT), else 0
    tokens: int = 0  # training tokens of all the steps run, a resumed run's earlier ones included
    elapsed_s: float = 0.0  # seconds spent in training steps, likewise
    skipped_nonfinite: int = 0


def _eval_sums(model, tokens, batch_size, seq_len, max_tokens, autocast_dtype, dims, should_stop):
    """(summed cross-entropy, target count) over the windows (all ranks' sums); (None, None) when stopped."""
    device = next(model.parameters()).device
    world, rank = (dims.world, dims.rank) if dims is not None and dims.distributed else (1, 0)
    total, count = 0.0, 0
    for x, y in eval_batches(tokens, batch_size, seq_len, max_tokens):
        if should_stop is not None and should_stop():
            return None, None
        share = x.shape[0] % world == 0
        if share:
            rows = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
            x, y = x[rows], y[rows]
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out = model(x, targets=y)
        # a batch every rank ran whole counts once (rank 0's copy)
        if share or rank == 0:
            total += out.ce_loss.item() * y.numel()
            count += y.numel()
    if world > 1:
        sums = torch.tensor([total, count], dtype=torch.float64, device=device)  # (NCCL: on the GPU)
        dist.all_reduce(sums)
        total, count = sums[0].item(), int(sums[1].item())
    return total, count


@torch.no_grad()
def evaluate(model: MoETransformer, tokens, batch_size: int, seq_len: int, max_tokens: int,
             autocast_dtype: torch.dtype | None = None, dims: ParallelDims | None = None,
             should_stop: Callable[[], bool] | None = None) -> dict[str, float] | None:
    """Mean cross-entropy over fixed validation windows (eval mode: no noise, eval capacity); None
    when ``should_stop()`` turns true between two batches (a Ctrl-C: the run's stop need not wait).

    Under torch.distributed (``dims``) every rank takes an equal share of each window batch (the
    whole batch when it does not divide) and the sums are all-reduced: the same figure as one process.

    Every window is full (no padding; the last batch may hold fewer windows). NOTE: with a capacity
    factor or expert-choice routing a token's routing depends on the other tokens of its forward pass
    (the capacity is per batch), so the figure then depends on ``batch_size`` (and, under
    torch.distributed without expert parallelism, on the share each rank runs)."""
    was_training = model.training
    model.eval()
    try:  # (the mode comes back however this ends: a short split's error, a second Ctrl-C)
        total, count = _eval_sums(model, tokens, batch_size, seq_len, max_tokens, autocast_dtype, dims, should_stop)
    finally:
        model.train(was_training)
    if count is None:
        return None
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


class _StopFlag:
    """SIGINT/SIGTERM ask for a clean stop: the loop saves a checkpoint after the current step.

    The first signal is acknowledged at once on stderr. A second one outside a save stops at once
    without saving (KeyboardInterrupt; the checkpoints on disk are whole: each is written aside and
    renamed into place). Inside :meth:`saving` every further signal waits for the save to finish, so
    pressing Ctrl-C again never costs the checkpoint being written, the run's first one included.

    Not under torch.distributed: there torchrun signals every worker when one fails, and a worker
    blocked in a collective must die at once rather than try to save (the last periodic checkpoint
    stays)."""

    def __init__(self, enabled: bool = True):
        self.signal: int | None = None
        self._old: dict[int, Any] = {}
        self.enabled = enabled
        self._saving = False

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM) if self.enabled else ():
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, the caller stops us instead
                pass
        return self

    def _handle(self, signum, frame):
        if self._saving:
            print("\nmoekit: still saving the checkpoint; stopping right after it", file=sys.stderr, flush=True)
            self.signal = self.signal or signum
            return
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nmoekit: {signal.Signals(signum).name} received: stopping after this step and saving a "
              f"checkpoint (press Ctrl-C again to stop at once without saving)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def saving(self):
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by this signal (130 for SIGINT), 0 when none came."""
        return 128 + self.signal if self.signal is not None else 0

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _on_main(dims: ParallelDims, fn: Callable[[], Any], share: bool = True) -> Any:
    """``fn()`` on rank 0 only, the others waiting; its exception is raised on every rank, and its
    result reaches them too when ``share`` (keep that to small values: it is pickled and sent)."""
    if not dims.distributed:
        return fn()
    box: list[Any] = [None, None]
    result = None
    if dims.is_main:
        try:
            result = fn()
            box[0] = result if share else None
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            box[1] = err
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return result if dims.is_main else box[0]


@dataclass
class _Run:
    """A run between two steps: what :func:`_start` set up and the counters the steps advance."""

    cfg: TrainConfig
    dims: ParallelDims
    out: Path
    tokenizer: Any
    data: Any
    mcfg: ModelConfig
    model: MoETransformer
    optimizer: torch.optim.Optimizer
    metrics: MetricsLog | None
    step_fn: Callable
    device: torch.device
    autocast_dtype: torch.dtype | None
    flops_per_token: float
    step: int = 0  # optimizer steps done
    tokens: int = 0
    elapsed: float = 0.0  # seconds inside training steps (evaluation and saving excluded)
    skipped: int = 0  # steps skipped as non-finite
    last_loss: float | None = None
    last_val: float | None = None
    last_val_step: int | None = None

    @property
    def rows(self) -> slice:
        """This rank's rows of each global batch."""
        per_rank = self.cfg.batch_size // self.dims.world
        return slice(self.dims.rank * per_rank, (self.dims.rank + 1) * per_rank)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_dtype is not None)


@dataclass
class _Step:
    """One optimizer step's figures (losses are the global batch's, averaged over its micro-batches)."""

    loss: float
    ce_loss: float
    lr: float
    grad_norm: float
    seconds: float
    outs: list


def _device(cfg: TrainConfig) -> torch.device:
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        raise ValueError(f"--device={cfg.device!r} is invalid: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device={cfg.device!r} is invalid: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device={cfg.device!r} is invalid: expected cpu, cuda or cuda:N")
    return device


def _start(cfg: TrainConfig, dims: ParallelDims, resume: bool, overwrite: bool) -> _Run:
    """Checks everything that can be checked, then prepares the run directory, the data, the model
    and the optimizer (from the last checkpoint when resuming). Nothing is written before the checks,
    and a failure after the directory was made removes it."""
    if cfg.batch_size % dims.world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {dims.world} processes "
                         f"(each takes an equal share of the batch)")
    main = dims.is_main
    out = Path(cfg.out)
    # a run with a checkpoint continues; any other starts at step 0 (a --resume of a run stopped before
    # its first checkpoint included: it takes --init-from's weights like a new run)
    continuing = resume and out.is_dir() and ckpt_io.latest_checkpoint(out) is not None
    if cfg.warmup > cfg.steps and not continuing:  # (a resumed run may be cut short of its saved warmup)
        raise ValueError(f"--warmup={cfg.warmup} is invalid: expected at most --steps={cfg.steps} (the learning rate "
                         f"would never reach --lr)")
    device = _device(cfg)
    mcfg = model_config_for(cfg, vocab_size=cfg.vocab_size if cfg.tokenizer == "bpe" else 256)  # a bad preset,
    # override or seq_len fails before any file is written
    init_ckpt = None
    if cfg.init_from is not None and not continuing:  # so does an --init-from checkpoint that does not fit
        init_ckpt = check_init_checkpoint(cfg.init_from, lambda vocab: model_config_for(cfg, vocab))
    corpus = open_corpus(cfg.data, cfg.val_fraction, seq_len=cfg.seq_len)  # so does bad --data
    check_memory(mcfg, cfg, device)  # and a model this machine cannot train
    existed = out.exists()
    resuming = _on_main(dims, lambda: prepare_run_dir(out, resume, overwrite))
    try:
        if resuming:
            latest = ckpt_io.resolve(out)
            saved = ckpt_io.verify(latest)
            saved_train = TrainConfig.absolute_paths(saved.get("train") or {})
            mine = cfg.to_dict()
            differ = sorted(k for k in mine if k not in RESUMABLE and saved_train.get(k, mine[k]) != mine[k])
            if differ:
                raise ValueError(f"--resume: option(s) {differ} differ from the run saved in {latest}; "
                                 f"resume with the run's own options (only {', '.join(RESUMABLE[1:])} may change)")
            tokenizer = load_tokenizer(latest)
        else:
            def make_tokenizer():
                tok = _build_tokenizer(cfg, corpus)
                tok.save(out)
                return tok

            tokenizer = _on_main(dims, make_tokenizer, share=False)
            if not main:
                tokenizer = load_tokenizer(out)
        data = _on_main(dims, lambda: load_tokens(corpus, tokenizer), share=False)  # rank 0 fills the token cache
        if not main:
            data = load_tokens(corpus, tokenizer)
        for part, need in (("training", cfg.seq_len + 2), ("validation", cfg.seq_len + 1)):
            have = len(data.train if part == "training" else data.val)
            if have < need:
                raise ValueError(f"--data {cfg.data or 'the default corpus'}: its {part} split has {have} tokens, "
                                 f"fewer than one window of --seq-len={cfg.seq_len} needs ({need})")

        mcfg = model_config_for(cfg, tokenizer.vocab_size)
        torch.manual_seed(cfg.seed)
        model = MoETransformer(mcfg)  # whole and identical on every rank; then each keeps its experts
        if resuming:
            ckpt_io.load_weights(latest, model)
        elif init_ckpt is not None:
            ckpt_io.load_weights(init_ckpt, model)
        if dims.ep > 1:
            shard_experts(model, dims)
        model.to(device)
        # The fused kernel (CPU and CUDA) updates all of a parameter's state in one pass: on 2 CPU cores
        # 6x faster than the per-tensor loop for a 60M-parameter model (31 vs 181 ms a step, a one-off
        # timing of opt.step(); `python benchmarks/train.py` shows the effect on a whole step).
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters())
        optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                      fused=fused)
        metrics = MetricsLog(out / "metrics.jsonl") if main else None
        step_fn = data_parallel(model) if dims.distributed else model  # DDP: all but the experts (sync_expert_grads)
        run = _Run(cfg, dims, out, tokenizer, data, mcfg, model, optimizer, metrics,
                   torch.compile(step_fn) if cfg.compile else step_fn, device,
                   torch.bfloat16 if cfg.dtype == "bf16" else None, flops_per_token(mcfg, cfg.seq_len))
        if resuming:
            slices = expert_slices(model, optimizer, dims) if dims.ep > 1 else None
            state = ckpt_io.load_trainer_state(latest, optimizer, slices)
            for group in optimizer.param_groups:  # load_state_dict restores the saved kernel choice: keep ours
                group["fused"], group["foreach"] = fused, None
            run.step, run.tokens, run.elapsed = state["step"], state["tokens"], state["elapsed"]
            run.skipped = state.get("skipped_nonfinite", 0)
            if metrics is not None:
                metrics.truncate_after(run.step)
        elif main:
            (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            (out / "model_config.json").write_text(json.dumps(mcfg.to_dict(), indent=2) + "\n")
    except BaseException:
        if main and not resuming:  # a failed start leaves nothing in the user's way
            if existed:  # an empty directory given as --out, or a run --overwrite (or a restart) replaced
                for child in out.iterdir():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            else:
                shutil.rmtree(out, ignore_errors=True)
        raise
    model.train()
    return run


def _train_step(run: _Run, step: int) -> _Step:
    """Forward and backward over the step's micro-batches, gradient sync and clipping, then the
    optimizer step, or, for a non-finite loss or gradient, a stop naming where it first appeared
    (or a counted skip with ``skip_nonfinite``)."""
    cfg, dims, model, optimizer = run.cfg, run.dims, run.model, run.optimizer
    t0 = time.perf_counter()
    lr = lr_at(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    loss_sum, ce_sum, outs = 0.0, 0.0, []
    for micro in range(cfg.grad_accum):
        x, y = get_batch(run.data.train, cfg.batch_size, cfg.seq_len, cfg.seed, step, micro)
        x, y = x[run.rows].to(run.device), y[run.rows].to(run.device)
        sync = micro == cfg.grad_accum - 1 or not dims.distributed
        with contextlib.nullcontext() if sync else run.step_fn.no_sync():  # DDP: reduce on the last micro-batch
            with run.autocast():
                res = run.step_fn(x, targets=y)
            (res.loss / cfg.grad_accum).backward()
        loss_sum += res.loss.item() / cfg.grad_accum
        ce_sum += res.ce_loss.item() / cfg.grad_accum
        outs.append(res)
    if dims.distributed:
        sync_expert_grads(model, dims)
        grad_norm = clip_grad_norm(model, cfg.grad_clip or float("inf"), dims)
        losses = torch.tensor([loss_sum, ce_sum], dtype=torch.float64, device=run.device)  # (NCCL: on the GPU)
        dist.all_reduce(losses)  # the batch's loss: the mean of the ranks' equal-sized shares
        loss_sum, ce_sum = (losses / dims.world).tolist()
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    if math.isfinite(loss_sum) and bool(torch.isfinite(grad_norm)):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_expert_biases(model)
    else:
        where = first_nonfinite(model, x, y, run.autocast_dtype)
        what = f"step {step + 1}: loss {loss_sum}, gradient norm {grad_norm.item()}; first non-finite: {where}"
        if not cfg.skip_nonfinite:
            last = ckpt_io.latest_checkpoint(run.out)
            raise FloatingPointError(f"{what}. Training stopped; the last good checkpoint "
                                     f"{last if last else '(none yet)'} is kept. Resume with --resume, "
                                     f"adding --skip-nonfinite to skip such steps")
        run.skipped += 1
        if dims.is_main:
            print(f"moekit: skipped {what} ({run.skipped} skipped so far)", file=sys.stderr)
        optimizer.zero_grad(set_to_none=True)
        for layer in model.moe_layers:  # the skipped step's loads do not move the bias
            load = getattr(layer.router, "load_since_update", None)  # (token-choice routers only)
            if load is not None:
                load.zero_()
    seconds = time.perf_counter() - t0
    run.elapsed += seconds
    run.tokens += cfg.tokens_per_step
    run.step = step + 1
    run.last_loss = ce_sum
    return _Step(loss_sum, ce_sum, lr, grad_norm.item(), seconds, outs)


def _record(run: _Run, st: _Step) -> dict:
    """The metrics.jsonl record of the step just run."""
    return {"step": run.step, "loss": st.loss, "ce_loss": st.ce_loss, "lr": st.lr, "tokens": run.tokens,
            "flops": run.flops_per_token * run.tokens, "tokens_per_s": run.cfg.tokens_per_step / st.seconds,
            "elapsed_s": run.elapsed, "grad_norm": st.grad_norm, "skipped_nonfinite": run.skipped,
            **layer_metrics(st.outs)}


def _show(bar, run: _Run, st: _Step) -> None:
    """The progress bar's figures, loud about collapsed routing."""
    bar.update(1)
    postfix = {"loss": f"{st.ce_loss:.3f}", "tok/s": f"{run.cfg.tokens_per_step / st.seconds:,.0f}"}
    routing = st.outs[-1].routing if st.outs else None
    if routing:
        postfix["imbalance"] = f"{sum(s.max_load_ratio.item() for s in routing.values()) / len(routing):.2f}"
        moe = run.mcfg.moe
        if moe is not None and (moe.router in ("top_p", "relu") or moe.num_null_experts):  # compute varies per token
            postfix["exp/tok"] = f"{sum(s.experts_per_token.item() for s in routing.values()) / len(routing):.2f}"
        collapsed = [name for name, s in routing.items() if collapsed_experts(s.tokens_per_expert.tolist())]
        if collapsed:
            postfix["COLLAPSE"] = "layers " + ",".join(map(str, collapsed))
    if run.skipped:
        postfix["skipped"] = run.skipped
    if run.last_val is not None:
        postfix["val"] = f"{run.last_val:.3f}"
    bar.set_postfix(postfix)


def _save(run: _Run) -> None:
    """A checkpoint of the run's state after ``run.step`` steps (every rank takes part in gathering)."""
    dims = run.dims
    model_state = full_state_dict(run.model, dims)
    optimizer_state = full_optimizer_state(run.model, run.optimizer, dims)
    if dims.is_main:
        ckpt_io.save_checkpoint(run.out, run.step, run.model, run.mcfg, run.tokenizer, run.cfg.to_dict(),
                                run.optimizer, {"tokens": run.tokens, "elapsed": run.elapsed,
                                                "skipped_nonfinite": run.skipped},
                                run.cfg.keep_last, model_state=model_state, optimizer_state=optimizer_state)
    if dims.distributed:
        dist.barrier()


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, progress: bool = True,
          on_eval: Callable[[dict], None] | None = None) -> TrainResult:
    """Runs (or resumes) a training run in ``cfg.out``; see the module docstring.

    Under torchrun every process calls it: ``cfg.ep`` experts-parallel degree, data parallel over
    all processes (rank r takes rows [r·b, (r+1)·b) of each global batch, b = batch_size / world);
    rank 0 writes the files. A run resumes at any EP degree (checkpoints hold whole experts)."""
    dims = init_distributed(cfg.ep, backend="nccl" if cfg.device.startswith("cuda") else "gloo")
    run = _start(cfg, dims, resume, overwrite)
    bar = None
    if progress and dims.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=run.step, unit="step", dynamic_ncols=True)

    def closing(obj):  # closed however the loop ends, an exception included
        return contextlib.closing(obj) if obj is not None else contextlib.nullcontext()

    with _StopFlag(enabled=not dims.distributed) as stop, closing(run.metrics), closing(bar):
        for step in range(run.step, cfg.steps):
            st = _train_step(run, step)
            done = run.step
            # a requested stop skips the evaluation: the step's checkpoint is what matters then
            evaluating = (done % cfg.eval_every == 0 or done == cfg.steps) and stop.signal is None
            record = _record(run, st) if evaluating or done % cfg.log_every == 0 else None
            if evaluating:
                ev = evaluate(run.model, run.data.val, cfg.batch_size, cfg.seq_len, cfg.eval_tokens,
                              run.autocast_dtype, dims, should_stop=lambda: stop.signal is not None)
                if ev is not None:
                    run.last_val, run.last_val_step = ev["loss"], done
                    record["val_loss"] = ev["loss"]
                    if on_eval and dims.is_main:
                        on_eval(record)
            if record is not None and run.metrics is not None:
                run.metrics.append(record)
            if bar is not None:
                _show(bar, run, st)
            if done % cfg.save_every == 0 or done == cfg.steps or stop.signal is not None:
                with stop.saving():
                    _save(run)
            if stop.signal is not None:
                break
    return TrainResult(run.out, run.step, run.last_loss, run.last_val, stop.signal is not None, run.last_val_step,
                       stop.exit_code, run.tokens, run.elapsed, run.skipped)
