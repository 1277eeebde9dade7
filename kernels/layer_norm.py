"""LayerNorm and RMSNorm forward/backward, with a frozen-affine mode that skips the weight gradients.

Why: in the emulator nearly every norm is frozen (the middle blocks, the final norm) but the gradient
still has to cross it to reach the adapter blocks below. Then only d(input) is needed, one row at a
time and fully parallel; the d(weight)/d(bias) column reductions across all tokens, the costly part of a
norm's backward, run only for norms that train (the adapter blocks in `full` mode). The mode is chosen
per call from autograd's `needs_input_grad`, so it follows `requires_grad` as the tuning mode sets it.

RMSNorm follows HF's Llama convention: normalise in fp32, round the normalised value to the input
dtype, then multiply by the weight (the output dtype is the promotion of the two).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from offsite_ds.kernels.runtime import (INTERPRETING, autocast_off, choose_backend, next_power_of_2, on_device,
                                        sm_count, tl, triton)

MAX_FUSED_COLUMNS = 65536  # one row must fit one program's registers/shared memory


@triton.jit
def _norm_forward_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, stride_x, stride_y, n_rows, n_cols, eps,
    RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, CAST_XHAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / n_cols
        xc = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(mean_ptr + rows, mean, mask=row_mask)
    var = tl.sum(xc * xc, axis=1) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)
    y = xc * rstd[:, None]
    if CAST_XHAT:
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_backward_kernel(
    dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, db_partial_ptr,
    stride_dy, stride_x, stride_dx, n_rows, n_cols,
    RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """d(input) for every row; with COMPUTE_DW/DB each program also sums its rows' weight/bias gradient
    into its own partial row (reduced across programs afterwards). Programs stride over row blocks."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if COMPUTE_DW:
        dw_acc = tl.zeros([BLOCK_N], tl.float32)
    if COMPUTE_DB:
        db_acc = tl.zeros([BLOCK_N], tl.float32)
    n_blocks = tl.cdiv(n_rows, BLOCK_M)
    for block in range(pid, n_blocks, n_programs):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        if RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_WEIGHT:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, axis=1) / n_cols
        if RMS:
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(wdy, axis=1) / n_cols
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(dx_ptr + rows64[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if COMPUTE_DB:
            db_acc += tl.sum(dy, axis=0)
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=col_mask)
    if COMPUTE_DB:
        tl.store(db_partial_ptr + pid * n_cols + cols, db_acc, mask=col_mask)


def _block_config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N columns, num_warps). GPU: whole rows, a few rows per program for narrow
    ones (H100 defaults, not tuned on hardware). Interpreter: many rows per program (its cost is per program)."""
    block_n = next_power_of_2(n_cols)
    if INTERPRETING:
        return max(1, min(128, 65536 // block_n)), block_n, 4
    block_m = max(1, min(16, 4096 // block_n))
    warps = min(16, max(1, block_m * block_n // 512))
    return block_m, block_n, warps


class NormFunction(torch.autograd.Function):
    """LayerNorm (rms=False) or RMSNorm (rms=True) over the last dimension of a 2-D input."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms, cast_normalized, out_dtype):
        n_rows, n_cols = x.shape
        y = torch.empty(n_rows, n_cols, device=x.device, dtype=out_dtype)
        mean = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        block_m, block_n, warps = _block_config(n_cols)
        grid = (triton.cdiv(n_rows, block_m),)
        with on_device(x):
            _norm_forward_kernel[grid](
                x, y, weight if weight is not None else x, bias if bias is not None else x, mean, rstd,
                x.stride(0), y.stride(0), n_rows, n_cols, float(eps),
                RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, CAST_XHAT=cast_normalized,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.rms = rms
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dy = dy.contiguous()
        n_rows, n_cols = x.shape
        want_dx, want_dw, want_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        compute_dw = bool(want_dw and weight is not None)
        compute_db = bool(want_db and ctx.has_bias)
        block_m, block_n, warps = _block_config(n_cols)
        n_blocks = triton.cdiv(n_rows, block_m)
        # Frozen affine: one program per row block. Training affine: a persistent grid whose per-program
        # partial sums are reduced in torch.
        n_programs = min(n_blocks, 4 * sm_count(x.device)) if (compute_dw or compute_db) else n_blocks
        dx = torch.empty_like(x)
        dw_partial = torch.empty(n_programs, n_cols, device=x.device, dtype=torch.float32) if compute_dw else x
        db_partial = torch.empty(n_programs, n_cols, device=x.device, dtype=torch.float32) if compute_db else x
        with on_device(dy):
            _norm_backward_kernel[(n_programs,)](
                dy, x, weight if weight is not None else x, mean, rstd, dx, dw_partial, db_partial,
                dy.stride(0), x.stride(0), dx.stride(0), n_rows, n_cols,
                RMS=ctx.rms, HAS_WEIGHT=weight is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else None
        db = db_partial.sum(0).to(weight.dtype if weight is not None else x.dtype) if compute_db else None
        return (dx if want_dx else None), dw, db, None, None, None, None


def reference_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """HF Llama RMSNorm: fp32 statistics, normalised value rounded to the input dtype, then * weight."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h.to(x.dtype)
    return h if weight is None else weight * h


def _use_kernel(backend: str, x: torch.Tensor, *params) -> bool:
    return x.shape[-1] <= MAX_FUSED_COLUMNS and x.numel() > 0 and choose_backend(backend, x, *params) == "triton"


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5,
               backend: str = "auto") -> torch.Tensor:
    """F.layer_norm over the last dimension; weight/bias gradients only when they require grad."""
    if not _use_kernel(backend, x, weight, bias):
        return reference_layer_norm(x, weight, bias, eps)
    if x.is_cuda and torch.is_autocast_enabled("cuda"):  # CUDA autocast runs layer_norm in fp32; so do we
        # (CPU autocast leaves layer_norm in the input's dtype, as the kernel does without this cast)
        x = x.float()
        weight = None if weight is None else weight.float()
        bias = None if bias is None else bias.float()
    with autocast_off(x):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y = NormFunction.apply(x2, _contiguous(weight), _contiguous(bias), eps, False, False, x.dtype)
    return y.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """HF-style RMSNorm over the last dimension; the weight gradient only when it requires grad."""
    if not _use_kernel(backend, x, weight):
        return reference_rms_norm(x, weight, eps)
    out_dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
    with autocast_off(x):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y = NormFunction.apply(x2, _contiguous(weight), None, eps, True, True, out_dtype)
    return y.view(x.shape)


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


__all__ = ["NormFunction", "layer_norm", "reference_layer_norm", "reference_rms_norm", "rms_norm"]
