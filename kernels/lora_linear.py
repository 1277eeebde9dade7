"""LoRA linear: frozen base matmul plus the low-rank path, with one output write.

y = x W^T + b + s * (x A^T) B^T, with W (and b) frozen. PEFT runs the base linear, then lora_A, lora_B, a
scale and an add, each a separate pass over the [tokens, out] output. Two ways to do better live here:

- `gemm="cublas"` (the default): cuBLAS for x W^T (+ b), then `addmm_` adds the rank-r product into that
  output in place: two GEMM calls, no extra [tokens, out] tensor, no extra elementwise pass.
- `gemm="triton"`: one Triton GEMM computes x W^T and adds (u s) B^T in the same tile before writing the
  output once (saves one [tokens, out] read+write, but replaces cuBLAS for the big GEMM). It is kept
  selectable, not the default, until a GPU measurement (benchmarks/kernel_bench.py, run by
  scripts/gpu_acceptance.sh) shows it beating cuBLAS + addmm_. fp32 always takes cuBLAS (an IEEE fp32 Triton
  GEMM needs 256-288 KB of shared memory in these configs and is slower than cuBLAS's).

The backward is the same maths the other way round: dx = dy W + (s dy B) A. Only A, B (and x) get
gradients; the base weight never does (it is frozen; when it is not, the reference path runs so that no
gradient is silently dropped). The LoRA branch runs in the compute dtype (autocast's, else x's), as under
autocast; `reference_lora_linear` is that same maths in plain torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from offsite_ds.kernels.runtime import (INTERPRETING, autocast_off, choose_backend, compute_dtype, dot_precision,
                                        next_power_of_2, on_device, tl, triton)

GEMMS = ("cublas", "triton")
DEFAULT_GEMM = "cublas"  # until a GPU measurement says the fused Triton GEMM wins (module docstring)


@triton.jit
def _matmul_lowrank_kernel(
    a_ptr, b_ptr, u_ptr, l_ptr, bias_ptr, c_ptr, M, N, K, R, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_um, stride_ur, stride_lr, stride_ln, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[M, N] = A[M, K] @ B[K, N] (+ U[M, R] @ L[R, N]) (+ bias[N]); any strides (transposes are free).

    M_BUCKET is unused by the maths: it is the autotuner's key for M (a power of two), so a new token
    count re-uses the configuration tuned for its bucket instead of benchmarking every config again.
    UPCAST (interpreter only) converts operands to fp32 before tl.dot, which the interpreter needs for
    half types; on a GPU the half operands go to the tensor cores with fp32 accumulation.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    a_ptrs = a_ptr + rm64[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn64[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_LOWRANK:
        rr = tl.arange(0, BLOCK_R)
        u = tl.load(u_ptr + rm64[:, None] * stride_um + rr[None, :] * stride_ur,
                    mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        low = tl.load(l_ptr + rr[:, None] * stride_lr + rn64[None, :] * stride_ln,
                      mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
        if UPCAST:
            u = u.to(tl.float32)
            low = low.to(tl.float32)
        acc = tl.dot(u, low, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm64[:, None] * stride_cm + rn64[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


# H100 candidates (bf16, K = 2048..16384); the autotuner picks per (M, N, K, R). Not yet measured on
# hardware: no GPU was available when they were written.
H100_CONFIGS = [
    ({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, 3, 8),
    ({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 3, 8),
    ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 4, 4),
    ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 4, 8),
    ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 4, 4),
    ({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, 4, 4),
    ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, 5, 4),
]
INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}
_tuned_kernel = None


def _autotuned():
    """Autotuning runs only on a GPU: the interpreter cannot benchmark, so its path never builds this."""
    global _tuned_kernel
    if _tuned_kernel is None:
        configs = [triton.Config(meta, num_stages=stages, num_warps=warps) for meta, stages, warps in H100_CONFIGS]
        _tuned_kernel = triton.autotune(configs=configs, key=["M_BUCKET", "N", "K", "R"])(_matmul_lowrank_kernel)
    return _tuned_kernel


def m_bucket(m: int) -> int:
    """The autotuner's bucket for M tokens: the next power of two (capped; beyond it the best tile is stable)."""
    return min(next_power_of_2(m), 16384)


def matmul_lowrank(a: torch.Tensor, b: torch.Tensor, u: torch.Tensor | None = None, low: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """a [M, K] @ b [K, N] (+ u [M, R] @ low [R, N]) (+ bias [N]) in one Triton GEMM (views with any strides)."""
    M, K = a.shape
    N = b.shape[1]
    R = 0 if u is None else u.shape[1]
    c = torch.empty(M, N, device=a.device, dtype=out_dtype or a.dtype)
    if M == 0 or N == 0:
        return c
    has_low = u is not None
    u_ = u if has_low else a
    low_ = low if has_low else b
    bias_ = bias if bias is not None else a
    args = (a, b, u_, low_, bias_, c, M, N, K, R, m_bucket(M),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), u_.stride(0), u_.stride(1) if has_low else 0,
            low_.stride(0) if has_low else 0, low_.stride(1), c.stride(0), c.stride(1))
    common = dict(HAS_BIAS=bias is not None, HAS_LOWRANK=has_low, UPCAST=INTERPRETING,
                  PRECISION=dot_precision(a.dtype), BLOCK_R=max(16, next_power_of_2(R)))
    with on_device(a):
        if INTERPRETING:
            meta = INTERPRETER_CONFIG
            grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
            _matmul_lowrank_kernel[grid](*args, **common, **meta)
        else:
            def grid(meta):
                return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

            _autotuned()[grid](*args, **common)
    return c


def _weight_as_k_by_n(weight: torch.Tensor, weight_is_in_out: bool) -> torch.Tensor:
    """The base weight as the [in, out] operand of x @ W (a transposed view for nn.Linear's [out, in])."""
    return weight if weight_is_in_out else weight.t()


class LoraLinearFunction(torch.autograd.Function):
    """Frozen base + LoRA over 2-D inputs already in the compute dtype; gradients for x, A, B (and bias)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, weight_is_in_out, x_lora, gemm):
        dtype = x.dtype
        a_c, b_c = lora_a.to(dtype), lora_b.to(dtype)
        xl = x if x_lora is None else x_lora
        u = torch.mm(xl, a_c.t())  # [M, R]
        w_kn = _weight_as_k_by_n(weight, weight_is_in_out)
        bias_c = None if bias is None else bias.to(dtype)
        if gemm == "triton":
            out = matmul_lowrank(x, w_kn, u * scaling, b_c.t(), bias_c)
        else:
            out = torch.mm(x, w_kn) if bias_c is None else torch.addmm(bias_c, x, w_kn)
            out.addmm_(u, b_c.t(), alpha=scaling)
        ctx.save_for_backward(xl, u, weight, lora_a, lora_b)
        ctx.gemm = gemm
        ctx.scaling = scaling
        ctx.weight_is_in_out = weight_is_in_out
        ctx.separate_lora_input = x_lora is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, dy):
        xl, u, weight, lora_a, lora_b = ctx.saved_tensors
        dy = dy.contiguous()
        dtype = dy.dtype
        s = ctx.scaling
        a_c, b_c = lora_a.to(dtype), lora_b.to(dtype)
        du = torch.mm(dy, b_c) * s  # [M, R]
        grad_b = torch.mm(dy.t(), u).mul_(s).to(lora_b.dtype) if ctx.needs_input_grad[4] else None
        grad_a = torch.mm(du.t(), xl).to(lora_a.dtype) if ctx.needs_input_grad[3] else None
        w_nk = _weight_as_k_by_n(weight, ctx.weight_is_in_out).t()  # dx = dy @ W_kn^T
        grad_x = grad_x_lora = None
        if ctx.separate_lora_input:  # dropout: two different inputs, nothing to fuse; cuBLAS for both
            if ctx.needs_input_grad[0]:
                grad_x = torch.mm(dy, w_nk)
            if ctx.needs_input_grad[7]:
                grad_x_lora = torch.mm(du, a_c)
        elif ctx.needs_input_grad[0]:
            grad_x = matmul_lowrank(dy, w_nk, du, a_c) if ctx.gemm == "triton" else torch.mm(dy, w_nk).addmm_(du, a_c)
        grad_bias = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, grad_x_lora, None


def reference_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, scaling: float, weight_is_in_out: bool = False,
                          x_lora: torch.Tensor | None = None) -> torch.Tensor:
    """base(x) + lora_B(lora_A(x_lora)) * scaling with the LoRA branch in the compute dtype (autocast's, else
    x's), as `lora_linear` computes it. PEFT differs only without autocast and with adapters in another dtype
    than x (it runs the branch in the adapter dtype); the patch probe bounds that difference."""
    dtype = compute_dtype(x)
    if weight_is_in_out:
        base = x @ weight if bias is None else torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(
            *x.shape[:-1], weight.shape[1])
    else:
        base = F.linear(x, weight, bias)
    xl = x if x_lora is None else x_lora
    low = F.linear(F.linear(xl.to(dtype), lora_a.to(dtype)), lora_b.to(dtype))
    return (base + low * scaling).to(base.dtype)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, weight_is_in_out: bool = False,
                x_lora: torch.Tensor | None = None, backend: str = "auto", gemm: str = DEFAULT_GEMM) -> torch.Tensor:
    """Frozen-base LoRA linear. weight [out, in] (nn.Linear) or [in, out] (Conv1D, weight_is_in_out);
    lora_a [r, in], lora_b [out, r]; x_lora: the LoRA branch's input when it differs (dropout);
    gemm: "cublas" (cuBLAS + addmm_) or "triton" (the fused GEMM; half types only, fp32 takes cuBLAS)."""
    if gemm not in GEMMS:
        raise ValueError(f"gemm '{gemm}' is not one of {', '.join(GEMMS)}")
    base_trains = torch.is_grad_enabled() and weight.requires_grad
    if base_trains or x.numel() == 0 or choose_backend(backend, x, weight, lora_a, lora_b) == "reference":
        return reference_lora_linear(x, weight, bias, lora_a, lora_b, scaling, weight_is_in_out, x_lora)
    in_features = weight.shape[0] if weight_is_in_out else weight.shape[1]
    out_features = weight.shape[1] if weight_is_in_out else weight.shape[0]
    if x.shape[-1] != in_features or tuple(lora_a.shape) != (lora_a.shape[0], in_features) \
            or tuple(lora_b.shape) != (out_features, lora_a.shape[0]):
        raise ValueError(f"LoRA shapes do not fit: x [..., {x.shape[-1]}], weight {tuple(weight.shape)}, "
                         f"A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}")
    dtype = compute_dtype(x)
    with autocast_off(x):
        x2 = x.reshape(-1, in_features).to(dtype)
        xl2 = None if x_lora is None else x_lora.reshape(-1, in_features).to(dtype)
        out = LoraLinearFunction.apply(x2, weight.to(dtype), bias, lora_a, lora_b, float(scaling),
                                       weight_is_in_out, xl2, "cublas" if dtype == torch.float32 else gemm)
    return out.view(*x.shape[:-1], out_features)


__all__ = ["DEFAULT_GEMM", "GEMMS", "LoraLinearFunction", "lora_linear", "m_bucket", "matmul_lowrank",
           "reference_lora_linear"]
