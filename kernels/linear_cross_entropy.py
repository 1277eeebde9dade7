"""Linear + cross-entropy for a FROZEN head: the loss and d(loss)/d(hidden), never the full logits.

Why it pays in offsite-tuning: the head is tied to the frozen embedding, so no head-weight gradient is
needed (one of the three big V x H matmuls disappears), and vocabularies are large (OPT 50,272; BLOOM
250,880), so materialising [tokens, V] logits in fp32 plus their gradient dominates peak memory. Here the
tokens are processed in chunks: logits of one chunk are computed by cuBLAS into a reusable buffer, one
Triton kernel turns them in place into the softmax gradient (online logsumexp over the row), and a second
matmul folds that into d(hidden). The gradient is computed during the forward (the head is frozen, so
nothing else is needed later) and only scaled in backward.

When even one token chunk of full vocabulary rows would exceed the memory budget, the vocabulary is
chunked too: a first pass gets each row's logsumexp from per-chunk partial results, a second pass
recomputes each vocabulary chunk's logits and accumulates the gradient (one extra matmul, bounded memory).

Semantics match `F.cross_entropy(F.linear(h, W, b).float(), y, ignore_index=..., reduction=...)` (how HF
computes the causal-LM loss): mean over non-ignored targets, ignored rows get zero gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from offsite_ds.errors import DataError
from offsite_ds.kernels.runtime import (INTERPRETING, autocast_off, choose_backend, compute_dtype, next_power_of_2,
                                        on_device, tl, triton)

REDUCTIONS = ("mean", "sum")
DEFAULT_CHUNK_BYTES = 128 * 2**20  # one token chunk's logits buffer; ~256 tokens at V=250,880 in bf16
MIN_TOKEN_CHUNK = 64  # below this the logits GEMM starves; chunk the vocabulary instead


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr, stride_row, targets_ptr, lse_ptr, target_logit_ptr, scale_ptr,
    n_rows, n_cols, col_start, ignore_index,
    HAS_LSE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Rows of one logits chunk (columns col_start .. col_start+n_cols of the vocabulary).

    Without HAS_LSE: online max/sum over the row -> logsumexp into lse_ptr, and the target's logit into
    target_logit_ptr where the target falls in this column range. With WRITE_GRAD: overwrite the logits
    in place with (softmax - onehot(target)) * scale, zero for ignored rows.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (targets != ignore_index)
    local_t = targets - col_start
    in_range = valid & (local_t >= 0) & (local_t < n_cols)
    row_base = logits_ptr + rows.to(tl.int64)[:, None] * stride_row
    if HAS_LSE:
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    else:
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = row_mask[:, None] & (cols[None, :] < n_cols)
            z = tl.load(row_base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past n_rows: keep the maths finite
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
            m = m_new
        lse = tl.where(row_mask, m + tl.log(tl.where(row_mask, s, 1.0)), 0.0)
        tl.store(lse_ptr + rows, lse, mask=row_mask)
        safe_t = tl.where(in_range, local_t, 0).to(tl.int64)
        z_t = tl.load(logits_ptr + rows.to(tl.int64) * stride_row + safe_t, mask=in_range, other=0.0)
        tl.store(target_logit_ptr + rows, z_t.to(tl.float32), mask=in_range)
    if WRITE_GRAD:
        scale = tl.load(scale_ptr)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = row_mask[:, None] & (cols[None, :] < n_cols)
            z = tl.load(row_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse[:, None])
            g = tl.where(cols[None, :] == local_t[:, None], g - 1.0, g) * scale
            g = tl.where(valid[:, None], g, 0.0)
            tl.store(row_base + cols[None, :], g.to(logits_ptr.dtype.element_ty), mask=mask)


def _row_kernel_config(n_cols: int, element_size: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_V, num_warps): one row per program with wide column tiles on a GPU - Liger-Kernel's
    measured H100 choice for its cross-entropy row kernel (32K-column tiles in 32 warps at wide vocabularies;
    16K for fp32 logits, which spill registers at 32K: scripts/compile_gate.py); many rows per program under
    the interpreter, whose cost is per program."""
    if INTERPRETING:
        block_v = min(next_power_of_2(n_cols), 2048)
        return max(1, min(64, 16384 // block_v)), block_v, 4
    block_v = min(next_power_of_2(n_cols), 65536 // max(2, element_size))
    return 1, block_v, 32 if block_v >= 32768 else 16 if block_v >= 8192 else 8


def _launch_rows(logits, targets, lse, target_logit, scale, col_start, ignore_index, has_lse, write_grad):
    n_rows, n_cols = logits.shape
    block_m, block_v, warps = _row_kernel_config(n_cols, logits.element_size())
    grid = (triton.cdiv(n_rows, block_m),)
    with on_device(logits):
        _cross_entropy_rows_kernel[grid](
            logits, logits.stride(0), targets, lse, target_logit, scale, n_rows, n_cols, col_start, ignore_index,
            HAS_LSE=has_lse, WRITE_GRAD=write_grad, BLOCK_M=block_m, BLOCK_V=block_v, num_warps=warps)


def chunk_sizes(n_tokens: int, vocab: int, element_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                vocab_chunk: int | None = None) -> tuple[int, int]:
    """(tokens per chunk, vocabulary columns per chunk) so that one logits buffer fits `chunk_bytes`."""
    if vocab_chunk is not None:
        vocab_chunk = max(1, min(int(vocab_chunk), vocab))
    elif vocab * MIN_TOKEN_CHUNK * element_size > chunk_bytes:
        vocab_chunk = max(1024, chunk_bytes // (MIN_TOKEN_CHUNK * element_size))
        vocab_chunk = min(vocab_chunk, vocab)
    else:
        vocab_chunk = vocab
    tokens = max(1, chunk_bytes // (vocab_chunk * element_size))
    if tokens >= MIN_TOKEN_CHUNK:
        tokens = tokens // MIN_TOKEN_CHUNK * MIN_TOKEN_CHUNK  # GEMM-friendly multiples
    return max(1, min(tokens, n_tokens)), vocab_chunk


def _check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):  # one host sync per call: a wrong label must not become a silent wrong loss
        value = int(targets[bad][0])
        raise DataError(f"label {value} is outside the vocabulary [0, {vocab}) and is not ignore_index "
                        f"{ignore_index}; the tokenizer and the model do not match")


def _fused_loss_and_grad(hidden, weight, targets, bias, ignore_index, reduction, want_grad, chunk_bytes,
                         vocab_chunk):
    """Loss (fp32 scalar) and, if want_grad, d(loss)/d(hidden) in hidden's dtype."""
    n_tokens = hidden.shape[0]
    vocab = weight.shape[0]
    device = hidden.device
    valid = targets != ignore_index
    n_valid = valid.sum()
    if reduction == "mean":
        scale = (1.0 / n_valid.to(torch.float32)).reshape(1)
    else:
        scale = torch.ones(1, device=device, dtype=torch.float32)
    lse = torch.empty(n_tokens, device=device, dtype=torch.float32)
    target_logit = torch.zeros(n_tokens, device=device, dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if want_grad else None
    tok_chunk, voc_chunk = chunk_sizes(n_tokens, vocab, hidden.element_size(), chunk_bytes, vocab_chunk)
    buffer = torch.empty(tok_chunk * voc_chunk, device=device, dtype=hidden.dtype)
    vocab_starts = list(range(0, vocab, voc_chunk))

    def logits_into(h, c0, c1):
        out = buffer[: h.shape[0] * (c1 - c0)].view(h.shape[0], c1 - c0)
        w = weight[c0:c1]
        if bias is None:
            torch.mm(h, w.t(), out=out)
        else:
            torch.addmm(bias[c0:c1], h, w.t(), out=out)
        return out

    for t0 in range(0, n_tokens, tok_chunk):
        t1 = min(t0 + tok_chunk, n_tokens)
        h, y = hidden[t0:t1], targets[t0:t1]
        if len(vocab_starts) == 1:
            logits = logits_into(h, 0, vocab)
            _launch_rows(logits, y, lse[t0:t1], target_logit[t0:t1], scale, 0, ignore_index, False, want_grad)
            if want_grad:
                torch.mm(logits, weight, out=grad_hidden[t0:t1])
            continue
        partial = torch.empty(len(vocab_starts), t1 - t0, device=device, dtype=torch.float32)
        for i, c0 in enumerate(vocab_starts):
            c1 = min(c0 + voc_chunk, vocab)
            logits = logits_into(h, c0, c1)
            _launch_rows(logits, y, partial[i], target_logit[t0:t1], scale, c0, ignore_index, False, False)
        lse[t0:t1] = torch.logsumexp(partial, dim=0)
        if want_grad:
            acc = torch.zeros(t1 - t0, hidden.shape[1], device=device, dtype=torch.float32)
            for c0 in vocab_starts:
                c1 = min(c0 + voc_chunk, vocab)
                logits = logits_into(h, c0, c1)
                _launch_rows(logits, y, lse[t0:t1], target_logit[t0:t1], scale, c0, ignore_index, True, True)
                acc += torch.mm(logits, weight[c0:c1])
            grad_hidden[t0:t1] = acc
    per_token = torch.where(valid, lse - target_logit, torch.zeros_like(lse))
    loss = per_token.sum() * scale[0] if reduction == "mean" else per_token.sum()
    return loss, grad_hidden


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """Autograd wrapper: gradient for `hidden` only (the head weight and bias must be frozen)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, ignore_index, reduction, chunk_bytes, vocab_chunk):
        want_grad = ctx.needs_input_grad[0]
        loss, grad_hidden = _fused_loss_and_grad(hidden, weight, targets, bias, ignore_index, reduction,
                                                 want_grad, chunk_bytes, vocab_chunk)
        ctx.save_for_backward(grad_hidden if want_grad else None)
        ctx.applied_scale = 1.0
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        """Scale the gradient computed in forward by d(out)/d(loss): in fp32 (a bf16 1/3 is 0.33398), in place
        (no second tokens x H tensor), not at all when it is 1 (one host read of a scalar per backward)."""
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden is None:
            return (None,) * 8
        scale = float(grad_loss)
        if scale != ctx.applied_scale:  # a second backward (retain_graph) rescales from what the first left
            grad_hidden.mul_(scale / ctx.applied_scale)  # a Python float: multiplied in fp32, rounded once
            ctx.applied_scale = scale
        return grad_hidden, None, None, None, None, None, None, None


def cast_frozen(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight.to(dtype).contiguous()`, cached on the weight: the frozen head (V x H, 0.5 GB for BLOOM) would
    otherwise be re-cast at every call. The key (data_ptr, _version) changes whenever the weight does."""
    if weight.dtype == dtype and weight.is_contiguous():
        return weight
    key = (weight.data_ptr(), weight._version, dtype, weight.device)
    cached = getattr(weight, "_offsite_cast", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    cast = weight.detach().to(dtype).contiguous()
    weight._offsite_cast = (key, cast)
    return cast


def reference_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   bias: torch.Tensor | None = None, ignore_index: int = -100,
                                   reduction: str = "mean") -> torch.Tensor:
    """Plain torch, the same maths as HF's causal-LM loss: full logits, upcast to fp32, cross-entropy."""
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         chunk_bytes: int = DEFAULT_CHUNK_BYTES, vocab_chunk: int | None = None,
                         backend: str = "auto") -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T (+ bias)` against `targets` without materialising the logits.

    hidden [..., H], weight [V, H], targets [...] (int). The fused path needs a frozen head: when the
    weight or bias requires a gradient (under grad mode) the reference path runs instead, so the result
    is never silently missing a gradient.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction '{reduction}' is not one of {', '.join(REDUCTIONS)}")
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"hidden [..., {hidden.shape[-1]}] does not match head weight {tuple(weight.shape)}")
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    targets1 = targets.reshape(-1)
    if targets1.shape[0] != hidden2.shape[0]:
        raise ValueError(f"{hidden2.shape[0]} hidden rows but {targets1.shape[0]} targets")
    head_trains = torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))
    if head_trains or choose_backend(backend, hidden, weight) == "reference":
        return reference_linear_cross_entropy(hidden2, weight, targets1, bias, ignore_index, reduction)
    _check_targets(targets1, weight.shape[0], ignore_index)
    dtype = compute_dtype(hidden2)
    with autocast_off(hidden2):
        h = hidden2.to(dtype).contiguous()
        w = cast_frozen(weight, dtype)  # under autocast this is the same cast F.linear would make
        b = None if bias is None else bias.to(dtype).contiguous()
        return FrozenHeadCrossEntropy.apply(h, w, targets1.contiguous().long(), b, ignore_index, reduction,
                                            int(chunk_bytes), vocab_chunk)


LIBRARIES = {"liger": ("liger-kernel", "liger_kernel.transformers.functional"),
             "cce": ("cut-cross-entropy", "cut_cross_entropy")}


def library_available(name: str) -> bool:
    """Whether the library kernel `name` (liger, cce) imports here."""
    import importlib

    try:
        importlib.import_module(LIBRARIES[name][1])
    except Exception:  # noqa: BLE001 - absent or broken (e.g. an ABI mismatch) both mean "not available"
        return False
    return True


def library_linear_cross_entropy(name: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 bias: torch.Tensor | None = None, ignore_index: int = -100,
                                 reduction: str = "mean") -> torch.Tensor:
    """The same loss through Liger-Kernel's fused linear cross-entropy or Apple's Cut Cross-Entropy (both
    CUDA-only), in the compute dtype with the frozen head cast once (as ours)."""
    hidden2, targets1 = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    dtype = compute_dtype(hidden2)
    with autocast_off(hidden2):
        h, w = hidden2.to(dtype), cast_frozen(weight, dtype)
        b = None if bias is None else bias.to(dtype)
        if name == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            return liger_fused_linear_cross_entropy(h, w, targets1, b, ignore_index=ignore_index, reduction=reduction)
        if name == "cce":
            if b is not None:
                raise ValueError("Cut Cross-Entropy has no head bias")
            from cut_cross_entropy import linear_cross_entropy as cce

            return cce(h, w, targets1, ignore_index=ignore_index, reduction=reduction)
    raise ValueError(f"library '{name}' is not one of {', '.join(LIBRARIES)}")


__all__ = ["FrozenHeadCrossEntropy", "LIBRARIES", "cast_frozen", "chunk_sizes", "library_available",
           "library_linear_cross_entropy", "linear_cross_entropy",
           "reference_linear_cross_entropy"]
