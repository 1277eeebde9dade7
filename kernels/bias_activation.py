"""Fused bias + activation for the MLP's first projection: ReLU (OPT), GELU exact and tanh (BLOOM, GPT-2).

Why: the MLP's inner activation is the widest tensor of a block (4H per token). Eager runs the matmul
with its bias, then the activation as a second pass over that tensor, and its backward a third. Here the
matmul runs without bias and one Triton pass adds the bias and applies the activation; the backward is
one pass too, and the bias-gradient reduction runs only when the bias trains (never in the frozen middle).
ReLU saves its output (what the next projection keeps anyway), GELU saves the pre-bias matmul output.

Kernels use only tl.* maths (tanh as 2*sigmoid(2x)-1, erf for exact GELU), which the interpreter supports.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from offsite_ds.kernels.runtime import INTERPRETING, choose_backend, next_power_of_2, on_device, tl, triton

ACTIVATIONS = ("relu", "gelu", "gelu_tanh")
_ACT_CODE = {"relu": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def _tanh(x):
    # libdevice tanh is unavailable to the interpreter; clamp so exp() never overflows (tanh(15) = 1 in fp32)
    x = tl.minimum(tl.maximum(x, -15.0), 15.0)
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _program_tile(n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's BLOCK_M x BLOCK_N tile of the 2-D grid, shared by forward and backward so both walk the
    tensor alike: (rows as int64, so row * stride cannot overflow past 2**31 elements, cols, column mask,
    tile mask)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    return rows.to(tl.int64), cols, col_mask, mask


@triton.jit
def _bias_activation_forward_kernel(
    x_ptr, b_ptr, y_ptr, n_rows, n_cols, stride_x, stride_y,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows64, cols, col_mask, mask = _program_tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
    z = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z = z + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if ACT == 0:
        y = tl.maximum(z, 0.0)
    elif ACT == 1:
        y = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    else:
        y = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    tl.store(y_ptr + rows64[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_activation_backward_kernel(
    dy_ptr, saved_ptr, b_ptr, dz_ptr, n_rows, n_cols, stride_dy, stride_saved, stride_dz,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dz = dy * act'(z). For ReLU `saved` is the output y (y > 0 iff z > 0); for GELU it is the pre-bias x."""
    rows64, cols, col_mask, mask = _program_tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
    dy = tl.load(dy_ptr + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(saved_ptr + rows64[:, None] * stride_saved + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        dz = tl.where(s > 0.0, dy, 0.0)
    else:
        z = s
        if HAS_BIAS:
            z = z + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if ACT == 1:
            cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
            pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
            dz = dy * (cdf + z * pdf)
        else:
            k = 0.7978845608028654
            t = _tanh(k * (z + 0.044715 * z * z * z))
            dz = dy * (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k * (1.0 + 0.134145 * z * z))
    tl.store(dz_ptr + rows64[:, None] * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)


def _tile(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): ~4K elements per program on a GPU (H100 default, untuned), large
    tiles under the interpreter (its cost is per program)."""
    block_n = min(next_power_of_2(n_cols), 1024)
    if INTERPRETING:
        return max(1, 65536 // block_n), block_n, 4
    return max(1, 4096 // block_n), block_n, 8


def _grid(n_rows: int, n_cols: int, block_m: int, block_n: int) -> tuple[int, int]:
    return triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n)


class BiasActivationFunction(torch.autograd.Function):
    """y = act(x + bias) over a 2-D x; gradients for x and (only when it trains) the bias."""

    @staticmethod
    def forward(ctx, x, bias, kind):
        n_rows, n_cols = x.shape
        y = torch.empty_like(x)
        code = _ACT_CODE[kind]
        block_m, block_n, warps = _tile(n_cols)
        with on_device(x):
            _bias_activation_forward_kernel[_grid(n_rows, n_cols, block_m, block_n)](
                x, bias if bias is not None else x, y, n_rows, n_cols, x.stride(0), y.stride(0),
                ACT=code, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        ctx.save_for_backward(y if code == 0 else x, bias)
        ctx.code = code
        return y

    @staticmethod
    def backward(ctx, dy):
        saved, bias = ctx.saved_tensors
        dy = dy.contiguous()
        n_rows, n_cols = saved.shape
        dz = torch.empty_like(saved)
        block_m, block_n, warps = _tile(n_cols)
        with on_device(dy):
            _bias_activation_backward_kernel[_grid(n_rows, n_cols, block_m, block_n)](
                dy, saved, bias if bias is not None else saved, dz, n_rows, n_cols, dy.stride(0), saved.stride(0),
                dz.stride(0), ACT=ctx.code, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=warps)
        db = None
        if bias is not None and ctx.needs_input_grad[1]:
            db = dz.sum(0, dtype=torch.float32).to(bias.dtype)
        return dz, db, None


def reference_bias_activation(x: torch.Tensor, bias: torch.Tensor | None, kind: str) -> torch.Tensor:
    z = x if bias is None else x + bias.to(x.dtype)
    if kind == "relu":
        return F.relu(z)
    if kind == "gelu":
        return F.gelu(z)
    return F.gelu(z, approximate="tanh")


def bias_activation(x: torch.Tensor, bias: torch.Tensor | None, kind: str, backend: str = "auto") -> torch.Tensor:
    """act(x + bias) with act in ACTIVATIONS; the output keeps x's dtype."""
    if kind not in ACTIVATIONS:
        raise ValueError(f"activation '{kind}' is not one of {', '.join(ACTIVATIONS)}")
    if x.numel() == 0 or choose_backend(backend, x, bias) == "reference":
        return reference_bias_activation(x, bias, kind)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    b = None if bias is None else bias.contiguous()
    return BiasActivationFunction.apply(x2, b, kind).view(x.shape)


def linear_bias_activation(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kind: str,
                           weight_is_in_out: bool = False, backend: str = "auto") -> torch.Tensor:
    """act(x @ W^T + b) (nn.Linear layout) or act(x @ W + b) (GPT-2's Conv1D layout, weight_is_in_out).

    The matmul stays in cuBLAS (under autocast when it is on, as eager would run it); bias and activation
    are fused after it.
    """
    pre = x @ weight if weight_is_in_out else F.linear(x, weight)
    return bias_activation(pre, bias, kind, backend)


__all__ = ["ACTIVATIONS", "BiasActivationFunction", "bias_activation", "linear_bias_activation",
           "reference_bias_activation"]
