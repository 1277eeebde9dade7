"""Perplexity, the paper's WikiText metric: sliding windows of `seq_len` tokens moved by `stride`.

Each token is scored once, with up to seq_len-1 tokens of context (the HF perplexity recipe), so the
number is comparable across models of the same tokenizer whatever their depth.

Memory does not grow with vocabulary x tokens: the model runs up to its final hidden states, and the
head scores them a chunk of rows at a time (the frozen-head linear-cross-entropy kernel on CUDA, chunks
of at most `CHUNK_BYTES` of fp32 logits elsewhere). A 262k-token vocabulary at 4 x 2048 tokens would
otherwise hold 8.6 GB of fp32 logits.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from offsite_ds.data import check_seq_len, tokenize_corpus, window_len
from offsite_ds.errors import DataError
from offsite_ds.families import backbone_and_head, logit_transform

CHUNK_BYTES = 64 << 20  # fp32 logits of one chunk of rows on the torch path
# ... but no fewer rows than this: a thinner product runs slowly. At BLOOM's vocabulary (250,880) a chunk of 64 MB
# is 66 rows, and the loss and gradient of 1,024 rows took 1.47x the time of whole logits; 267 rows 1.13x
# (experiments/bf16_and_chunk_speed.py chunks).
MIN_CHUNK_ROWS = 256


@torch.no_grad()
def head_nll(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, transform=None,
             chunk_bytes: int | None = None) -> float:
    """Summed cross-entropy of `head(hidden)` against `targets` (-100 ignored), never holding all logits.

    Same maths as HF's loss (head output upcast to fp32, then any family logit transform); rows are
    scored in chunks of `chunk_bytes` of logits, or by the fused kernel on CUDA where it applies.
    """
    keep = targets != -100
    hidden, targets = hidden[keep], targets[keep]
    if targets.numel() == 0:
        return 0.0
    weight = getattr(head, "weight", None)
    if (hidden.is_cuda and transform is None and isinstance(head, torch.nn.Linear)
            and not hasattr(weight, "ds_id")):  # a ZeRO-3 partitioned head must run through its own forward
        from offsite_ds.kernels.linear_cross_entropy import linear_cross_entropy

        return float(linear_cross_entropy(hidden, weight, targets, head.bias, reduction="sum"))

    def ce_sum(logits: torch.Tensor, rows: slice, _logits_of) -> torch.Tensor:
        return F.cross_entropy(logits, targets[rows], reduction="sum")

    return float(head_loss(hidden.detach(), head, ce_sum, transform, chunk_bytes))


def _windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) per window; only the last n_scored tokens of a window count."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        if end - begin < 2:
            break
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return out


def window_batches(n_tokens: int, seq_len: int, stride: int, batch_size: int) -> list[list[tuple[int, int, int]]]:
    """token_nll's batches: windows of equal length grouped `batch_size` at a time, each (begin, end, scored).

    One home for the order, so a caller that runs the model block by block (offsite_ds.block_stream) sees
    exactly the batches `token_nll` scores.
    """
    windows = _windows(n_tokens, seq_len, stride)
    if not windows:
        raise DataError(f"the evaluation text has {n_tokens} tokens; at least 2 are needed")
    by_len: dict[int, list[tuple[int, int, int]]] = {}
    for w in windows:
        by_len.setdefault(w[1] - w[0], []).append(w)
    return [group[i:i + batch_size] for group in by_len.values() for i in range(0, len(group), batch_size)]


def window_ids(ids: torch.Tensor, chunk: list[tuple[int, int, int]]) -> torch.Tensor:
    """[batch, length] ids of one of `window_batches`' batches."""
    return torch.stack([ids[b:e] for b, e, _ in chunk])


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each token's next-token distributions, in fp32 (one value per token), for a loss
    that weighs tokens (experiments/kl_focus.py) as well as for logit_kl's mean."""
    t = torch.log_softmax(teacher_logits.float(), -1)
    return (t.exp() * (t - torch.log_softmax(student_logits.float(), -1))).sum(-1)


def logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Mean over real tokens of KL(teacher || student) of the next-token distributions, in fp32."""
    kl = token_kl(student_logits, teacher_logits)
    m = torch.ones_like(kl) if mask is None else mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1)


def _chunked_head_loss(hidden: torch.Tensor, logits_of, chunk_loss, rows: int,
                       grad: torch.Tensor | None = None) -> torch.Tensor:
    """The sum of `chunk_loss` over chunks of `rows` rows through the head; with `grad`, the gradient of that sum
    with respect to `hidden` is written into it chunk by chunk (the fused-linear-loss pattern: no chunk's logits
    outlive it)."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for i in range(0, hidden.shape[0], rows):
        rows_here = slice(i, i + rows)
        with torch.enable_grad() if grad is not None else torch.no_grad():
            h = hidden[rows_here].detach().requires_grad_(grad is not None)
            loss = chunk_loss(logits_of(h), rows_here, logits_of)
            if grad is not None:
                (g,) = torch.autograd.grad(loss, h, allow_unused=True)
                grad[rows_here] = 0 if g is None else g
        total += loss.detach()
    return total


class _HeadLoss(torch.autograd.Function):
    """head_loss's training path: the loss and the gradient computed in forward, so backward only scales the
    stored gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, logits_of, chunk_loss, rows: int) -> torch.Tensor:
        grad = torch.empty_like(hidden)
        total = _chunked_head_loss(hidden, logits_of, chunk_loss, rows, grad)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None


def head_loss(hidden: torch.Tensor, head: torch.nn.Module, chunk_loss, transform=None,
              chunk_bytes: int | None = None) -> torch.Tensor:
    """The sum over chunks of rows of `hidden` (final hidden states, one row per token, any leading shape) of
    `chunk_loss(logits, rows, logits_of)`: a summed fp32 loss of those rows' logits (`rows`, a slice, indexes
    any per-row target; `logits_of` maps other hidden rows to logits the same way, for a teacher's). Rows go
    through the head `chunk_bytes` of fp32 logits at a time (default: CHUNK_BYTES, but at least MIN_CHUNK_ROWS
    rows) and, with a gradient wanted, it is computed per chunk
    in the same pass, so no tokens x vocabulary tensor is ever whole: 0.4 GB per fp32 logits tensor for
    SmolLM2's vocabulary at 4 x 512 tokens, 8 GB for BLOOM's at 4 x 2048. A gradient is refused for a trainable
    head: it gets none here."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    weight = getattr(head, "weight", None)
    vocab = getattr(head, "out_features", None) or getattr(weight, "ds_shape", weight.shape)[0]
    rows = max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * vocab)) if chunk_bytes is None else \
        max(1, chunk_bytes // (4 * vocab))

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        logits = head(x).float()
        return transform(logits) if transform is not None else logits

    if torch.is_grad_enabled() and hidden.requires_grad:
        if any(p.requires_grad for p in head.parameters()):
            raise ValueError("head_loss trains only what produces the hidden states: freeze the head first")
        return _HeadLoss.apply(hidden, logits_of, chunk_loss, rows)
    return _chunked_head_loss(hidden, logits_of, chunk_loss, rows)


def head_kl(student: torch.Tensor, teacher: torch.Tensor, head: torch.nn.Module, transform=None,
            chunk_bytes: int | None = None) -> torch.Tensor:
    """logit_kl of `head(student)` against `head(teacher)` (final hidden states, one row per token), through
    head_loss: neither model's logits are held whole. Why: the emulator's KL phase would otherwise hold several
    tokens x vocabulary fp32 tensors per step."""
    teacher = teacher.reshape(-1, teacher.shape[-1]).detach()

    def kl_sum(logits: torch.Tensor, rows: slice, logits_of) -> torch.Tensor:
        with torch.no_grad():
            target = logits_of(teacher[rows])
        return logit_kl(logits, target) * logits.shape[0]

    return head_loss(student, head, kl_sum, transform, chunk_bytes) / teacher.shape[0]


@torch.no_grad()
def token_nll(model: torch.nn.Module, ids: torch.Tensor, seq_len: int, stride: int | None = None,
              batch_size: int = 4) -> tuple[float, int]:
    """Summed negative log-likelihood and number of scored tokens of one id stream."""
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise DataError(f"--stride {stride} must be between 1 and --seq-len {seq_len}")
    device = next(model.parameters()).device
    backbone, head = backbone_and_head(model)
    transform = logit_transform(model.config)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for chunk in window_batches(ids.numel(), seq_len, stride, batch_size):
        length = chunk[0][1] - chunk[0][0]
        inputs = window_ids(ids, chunk).to(device)
        labels = inputs.clone()
        for row, (_, _, scored) in enumerate(chunk):
            labels[row, : length - scored] = -100
        hidden = backbone(input_ids=inputs)[0][:, :-1]
        target = labels[:, 1:]
        nll += head_nll(hidden.reshape(-1, hidden.size(-1)), target.reshape(-1), head, transform)
        count += int((target != -100).sum())
    if was_training:
        model.train()
    return nll, count


def default_seq_len(model) -> int:
    return window_len(1024, model.config)


def perplexity(model: torch.nn.Module, tokenizer, texts: list[str], seq_len: int | None = None,
               stride: int | None = None, batch_size: int = 4, max_tokens: int | None = None) -> float:
    """Perplexity of `texts` (joined by EOS) under `model`."""
    seq_len = seq_len or default_seq_len(model)
    check_seq_len(seq_len, model.config)
    ids = tokenize_corpus(texts, tokenizer)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    nll, count = token_nll(model, ids, seq_len, stride, batch_size)
    return math.exp(nll / count)
