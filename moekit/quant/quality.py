"""What quantization costs: the quantized model's next-token distributions against the reference model's.

Legend: B sequences, S tokens per sequence, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

import torch
import torch.nn.functional as F


@dataclass
class QualityReport:
    kl: float  # mean over predicted positions of KL(reference || quantized), nats
    top1_agreement: float  # fraction of positions whose most likely next token is the same
    ppl_reference: float  # perplexity of each model on the batches' own next tokens
    ppl_quantized: float
    ppl_change: float  # ppl_quantized / ppl_reference - 1
    positions: int

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"KL {self.kl:.3g} nats, top-1 agreement {100 * self.top1_agreement:.2f}%, perplexity "
                f"{self.ppl_reference:.4g} -> {self.ppl_quantized:.4g} ({100 * self.ppl_change:+.2f}%) "
                f"over {self.positions} positions")


@torch.no_grad()
def quality(model_ref: torch.nn.Module, model_q: torch.nn.Module,
            token_batches: Iterable[torch.Tensor]) -> QualityReport:
    """Compares ``model_q`` with ``model_ref`` on ``token_batches`` (each int [B, S], S >= 2): at every
    position but the last, the KL divergence of the next-token distributions, whether their argmax
    agrees, and each model's cross-entropy on the next token (perplexity). Sums in fp64."""
    kl = agree = nll_ref = nll_q = 0.0
    n = 0
    for ids_BS in token_batches:
        if ids_BS.dim() == 1:
            ids_BS = ids_BS[None]
        if ids_BS.dim() != 2 or ids_BS.shape[1] < 2:
            raise ValueError(f"quality: token batches must be [batch, seq] with seq >= 2, got {tuple(ids_BS.shape)}")
        V = model_ref.cfg.vocab_size
        lp_ref = F.log_softmax(model_ref(ids_BS).logits[:, :-1].double(), dim=-1).reshape(-1, V)
        lp_q = F.log_softmax(model_q(ids_BS).logits[:, :-1].double(), dim=-1).reshape(-1, V)
        target = ids_BS[:, 1:].reshape(-1, 1)
        kl += float((lp_ref.exp() * (lp_ref - lp_q)).sum())
        agree += float((lp_ref.argmax(-1) == lp_q.argmax(-1)).sum())
        nll_ref -= float(lp_ref.gather(1, target).sum())
        nll_q -= float(lp_q.gather(1, target).sum())
        n += target.shape[0]
    if n == 0:
        raise ValueError("quality: no token batches given")
    ppl_ref, ppl_q = math.exp(nll_ref / n), math.exp(nll_q / n)
    return QualityReport(max(kl / n, 0.0), agree / n, ppl_ref, ppl_q, ppl_q / ppl_ref - 1, n)


def random_batches(vocab_size: int, batches: int = 4, batch_size: int = 2, seq_len: int = 64,
                   seed: int = 0) -> list[torch.Tensor]:
    """Uniformly random token batches: held-out input for a model with no text to read."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (batch_size, seq_len), generator=g) for _ in range(batches)]
