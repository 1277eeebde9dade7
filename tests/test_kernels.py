"""Each Triton kernel against its plain-torch reference: forward and every gradient, odd shapes, fp32 and bf16.

conftest sets TRITON_INTERPRET=1 before triton is imported, so the kernels run in Triton's interpreter
on the CPU; test_triton_path_is_the_one_tested makes sure they really do (not the reference fallback).
fp32 must agree to 1e-5; bf16 kernels are compared with the fp32 maths on the same (bf16-rounded) inputs
and must agree to 2e-2 of the larger of 1 and the reference's magnitude (offsite_ds.kernels.tolerances.PARITY).
"""
import pytest
import torch

from offsite_ds.errors import DataError
from offsite_ds.kernels import (bias_activation, layer_norm, linear_bias_activation, linear_cross_entropy,
                                lora_linear, matmul_lowrank, reference_bias_activation, reference_layer_norm,
                                reference_linear_cross_entropy, reference_lora_linear, reference_rms_norm, rms_norm)
from offsite_ds.kernels.linear_cross_entropy import chunk_sizes
from offsite_ds.kernels.runtime import INTERPRETING, choose_backend
from offsite_ds.kernels.tolerances import PARITY, tolerance

ODD_SHAPES = [(1, 1, 1023), (3, 7, 257)]
DTYPES = [torch.float32, torch.bfloat16]


def assert_matches(got, ref, dtype, what=""):
    assert got is not None and ref is not None, what
    assert got.shape == ref.shape, what
    if dtype == torch.float32:
        tol = tolerance(PARITY, dtype)
        torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol, msg=what)
    else:
        err = float((got.float() - ref.float()).abs().max())
        bound = tolerance(PARITY, dtype) * max(1.0, float(ref.float().abs().max()))
        assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def grads(fn, inputs, grad_out=None):
    """Output and gradients of every input that requires grad (None for the others)."""
    for t in inputs:
        if t is not None and t.requires_grad:
            t.grad = None
    out = fn(*inputs)
    out.backward(grad_out if grad_out is not None else torch.ones_like(out))
    return out.detach(), [None if (t is None or not t.requires_grad) else t.grad.detach().clone() for t in inputs]


def leaf(t, dtype, requires_grad=True):
    return t.to(dtype).detach().requires_grad_(requires_grad)


def as_fp32(inputs):
    return [None if t is None else t.detach().float().requires_grad_(t.requires_grad) for t in inputs]


def test_triton_path_is_the_one_tested():
    assert INTERPRETING, "TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py)"
    assert choose_backend("auto", torch.zeros(1)) == "triton"


# ---------------------------------------------------------------- linear + cross-entropy (frozen head)

CE_CASES = [
    # (hidden shape, vocab, vocab_chunk, chunk_bytes)
    ((1, 1, 1023), 517, None, None),
    ((3, 7, 257), 1023, None, None),
    ((3, 7, 257), 1023, 300, None),  # vocabulary chunked: two-pass logsumexp
    ((3, 7, 33), 1023, None, 4 * 1023 * 5),  # 5-token chunks: several token chunks
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,vocab,vocab_chunk,chunk_bytes", CE_CASES)
def test_linear_cross_entropy_matches_reference(shape, vocab, vocab_chunk, chunk_bytes, dtype):
    gen = torch.Generator().manual_seed(0)
    hidden = leaf(torch.randn(shape, generator=gen), dtype)
    weight = leaf(torch.randn(vocab, shape[-1], generator=gen) * shape[-1] ** -0.5, dtype, requires_grad=False)
    targets = torch.randint(0, vocab, shape[:-1], generator=gen)
    if targets.numel() > 1:
        targets.view(-1)[::4] = -100
    kw = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    loss, (g,) = grads(lambda h: linear_cross_entropy(h, weight, targets, vocab_chunk=vocab_chunk, **kw), [hidden])
    h32 = as_fp32([hidden])[0]
    ref, (g_ref,) = grads(lambda h: reference_linear_cross_entropy(h.reshape(-1, shape[-1]), weight.float(),
                                                                   targets.reshape(-1)), [h32])
    assert_matches(loss, ref, dtype, "loss")
    assert_matches(g, g_ref, dtype, "d hidden")
    assert g.dtype == dtype


def test_linear_cross_entropy_bloom_vocabulary():
    """V = 250,880 (BLOOM) in one pass, with bias, sum reduction."""
    gen = torch.Generator().manual_seed(1)
    vocab, width = 250_880, 16
    hidden = leaf(torch.randn(4, width, generator=gen), torch.float32)
    weight = torch.randn(vocab, width, generator=gen) * 0.25
    bias = torch.randn(vocab, generator=gen) * 0.1
    targets = torch.tensor([0, vocab - 1, 123_456, -100])
    loss, (g,) = grads(lambda h: linear_cross_entropy(h, weight, targets, bias, reduction="sum"), [hidden])
    ref, (g_ref,) = grads(lambda h: reference_linear_cross_entropy(h, weight, targets, bias, reduction="sum"),
                          as_fp32([hidden]))
    assert_matches(loss, ref, torch.float32, "loss")
    assert_matches(g, g_ref, torch.float32, "d hidden")
    assert torch.all(g[3] == 0), "an ignored token must get no gradient"


def test_chunk_sizes_bound_the_logits_buffer():
    tokens, cols = chunk_sizes(4096, 250_880, 2)
    assert cols == 250_880 and tokens % 64 == 0 and tokens * cols * 2 <= 128 * 2**20
    tokens, cols = chunk_sizes(4096, 250_880, 2, chunk_bytes=8 * 2**20)  # too tight for 64 full rows
    assert cols < 250_880 and tokens * cols * 2 <= 8 * 2**20


def test_linear_cross_entropy_edge_cases():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(50, 8, generator=gen)
    hidden = leaf(torch.randn(5, 8, generator=gen), torch.float32)
    all_ignored = torch.full((5,), -100)
    loss, (g,) = grads(lambda h: linear_cross_entropy(h, weight, all_ignored), [hidden])
    assert torch.isnan(loss), "mean over zero tokens is NaN, as in torch"
    assert torch.all(g == 0)
    with pytest.raises(DataError, match="outside the vocabulary"):
        linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 50, 3, 4]))
    with torch.no_grad():  # evaluation: loss only
        targets = torch.tensor([1, 2, 3, 4, -100])
        assert_matches(linear_cross_entropy(hidden, weight, targets),
                       reference_linear_cross_entropy(hidden, weight, targets), torch.float32, "no-grad loss")


def test_trainable_head_falls_back_to_reference():
    """The fused path has no weight gradient, so a head that trains must get the reference path."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 8, generator=gen).requires_grad_(True)
    hidden = torch.randn(6, 8, generator=gen).requires_grad_(True)
    targets = torch.randint(0, 40, (6,), generator=gen)
    loss, (dh, dw) = grads(lambda h, w: linear_cross_entropy(h, w, targets), [hidden, weight])
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    want, (want_dh, want_dw) = grads(lambda h, w: reference_linear_cross_entropy(h, w, targets),
                                     as_fp32([hidden, weight]))
    assert_matches(loss, want, torch.float32, "loss")
    assert_matches(dw, want_dw, torch.float32, "dW")
    assert_matches(dh, want_dh, torch.float32, "dh")


# ---------------------------------------------------------------- LayerNorm / RMSNorm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_norm_matches_reference(shape, rms, frozen, dtype):
    gen = torch.Generator().manual_seed(4)
    width = shape[-1]
    x = leaf(torch.randn(shape, generator=gen) * 2 + 0.5, dtype)
    w = leaf(1 + 0.2 * torch.randn(width, generator=gen), dtype, requires_grad=not frozen)
    b = None if rms else leaf(0.2 * torch.randn(width, generator=gen), dtype, requires_grad=not frozen)
    dy = torch.randn(shape, generator=gen).to(dtype)
    if rms:
        fn, ref_fn = (lambda x, w, b: rms_norm(x, w, 1e-6)), (lambda x, w, b: reference_rms_norm(x, w, 1e-6))
    else:
        fn, ref_fn = (lambda x, w, b: layer_norm(x, w, b, 1e-5)), (lambda x, w, b: reference_layer_norm(x, w, b, 1e-5))
    out, got = grads(fn, [x, w, b], dy)
    ref, want = grads(ref_fn, as_fp32([x, w, b]), dy.float())
    assert out.dtype == dtype
    assert_matches(out, ref, dtype, "y")
    for name, g, r in zip(("dx", "dw", "db"), got, want):
        if r is None:
            assert g is None, f"{name} must not be computed"
        else:
            assert_matches(g, r, dtype, name)
    if frozen:
        assert w.grad is None, "frozen-affine mode computes no weight gradient"


def test_layer_norm_under_autocast_keeps_torchs_dtype_policy():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 40, generator=gen).bfloat16()
    w, b = torch.ones(40), torch.zeros(40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer_norm(x, w, b)
        want = torch.nn.functional.layer_norm(x, (40,), w, b)
    assert got.dtype == want.dtype
    assert_matches(got, want, want.dtype, "autocast layer_norm")


# ---------------------------------------------------------------- bias + activation

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frozen_bias", [True, False])
@pytest.mark.parametrize("kind", ["relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_bias_activation_matches_reference(shape, kind, frozen_bias, dtype):
    gen = torch.Generator().manual_seed(6)
    x = leaf(torch.randn(shape, generator=gen) * 3, dtype)
    b = leaf(torch.randn(shape[-1], generator=gen), dtype, requires_grad=not frozen_bias)
    dy = torch.randn(shape, generator=gen).to(dtype)
    out, got = grads(lambda x, b: bias_activation(x, b, kind), [x, b], dy)
    ref, want = grads(lambda x, b: reference_bias_activation(x, b, kind), as_fp32([x, b]), dy.float())
    assert out.dtype == dtype
    assert_matches(out, ref, dtype, "y")
    assert_matches(got[0], want[0], dtype, "dx")
    if frozen_bias:
        assert got[1] is None
    else:
        assert_matches(got[1], want[1], dtype, "db")


@pytest.mark.parametrize("in_out", [False, True])
def test_linear_bias_activation_both_weight_layouts(in_out):
    gen = torch.Generator().manual_seed(7)
    x = leaf(torch.randn(3, 7, 33, generator=gen), torch.float32)
    w = torch.randn(33, 65, generator=gen) * 0.2
    w = w if in_out else w.t().contiguous()
    b = torch.randn(65, generator=gen)
    out, (g,) = grads(lambda x: linear_bias_activation(x, w, b, "gelu_tanh", weight_is_in_out=in_out), [x])
    ref, (g_ref,) = grads(lambda x: reference_bias_activation(x @ w if in_out else x @ w.t(), b, "gelu_tanh"),
                          as_fp32([x]))
    assert_matches(out, ref, torch.float32, "y")
    assert_matches(g, g_ref, torch.float32, "dx")


# ---------------------------------------------------------------- LoRA linear

LORA_CASES = [
    # (x shape, out features, rank, Conv1D layout, dropout on the LoRA input, bias)
    ((1, 1, 1023), 257, 4, False, False, True),
    ((3, 7, 257), 129, 8, True, False, True),
    ((3, 7, 257), 129, 8, False, True, False),
]


@pytest.mark.parametrize("dtype,gemm", [(torch.float32, "cublas"), (torch.bfloat16, "cublas"),
                                        (torch.bfloat16, "triton")])  # fp32 always takes cuBLAS
@pytest.mark.parametrize("shape,out_features,rank,in_out,dropout,has_bias", LORA_CASES)
def test_lora_linear_matches_reference(shape, out_features, rank, in_out, dropout, has_bias, dtype, gemm):
    if dtype == torch.bfloat16 and shape[-1] > 300:
        shape = (1, 1, 255)  # interpreter time: the long-K bf16 case adds nothing the fp32 one does not cover
    gen = torch.Generator().manual_seed(8)
    k = shape[-1]
    x = leaf(torch.randn(shape, generator=gen), dtype)
    w = (torch.randn(k, out_features, generator=gen) if in_out else torch.randn(out_features, k, generator=gen))
    w = (w * k ** -0.5).to(dtype)
    bias = (torch.randn(out_features, generator=gen) * 0.1).to(dtype) if has_bias else None
    a = leaf(torch.randn(rank, k, generator=gen) * k ** -0.5, torch.float32)  # PEFT keeps adapters in fp32
    b = leaf(torch.randn(out_features, rank, generator=gen) * 0.1, torch.float32)
    keep = (torch.rand(shape, generator=gen) > 0.3).to(dtype) / 0.7
    dy = torch.randn(*shape[:-1], out_features, generator=gen).to(dtype)

    def fused(x, a, b):
        return lora_linear(x, w, bias, a, b, 2.0, in_out, x * keep if dropout else None, gemm=gemm)

    def ref(x, a, b):
        return reference_lora_linear(x, w.float(), None if bias is None else bias.float(), a, b, 2.0, in_out,
                                     x * keep.float() if dropout else None)

    out, got = grads(fused, [x, a, b], dy)
    want_out, want = grads(ref, as_fp32([x, a, b]), dy.float())
    assert out.dtype == dtype
    assert_matches(out, want_out, dtype, "y")
    for name, g, r in zip(("dx", "dA", "dB"), got, want):
        assert_matches(g, r, dtype, name)
    assert got[1].dtype == got[2].dtype == torch.float32, "adapter gradients keep the adapter dtype"


def test_lora_linear_with_trainable_base_uses_reference():
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(12, 20, generator=gen).requires_grad_(True)
    a = torch.randn(2, 20, generator=gen).requires_grad_(True)
    b = torch.randn(12, 2, generator=gen).requires_grad_(True)
    x = torch.randn(5, 20, generator=gen)
    out, got = grads(lambda w, a, b: lora_linear(x, w, None, a, b, 1.0), [w, a, b])
    assert w.grad is not None, "a base weight that trains must get its gradient"
    want_out, want = grads(lambda w, a, b: reference_lora_linear(x, w, None, a, b, 1.0), as_fp32([w, a, b]))
    assert_matches(out, want_out, torch.float32, "y")
    for name, g, r in zip(("dW", "dA", "dB"), got, want):
        assert_matches(g, r, torch.float32, name)


def test_matmul_lowrank_odd_shapes_and_strides():
    gen = torch.Generator().manual_seed(10)
    a = torch.randn(37, 70, generator=gen)
    b = torch.randn(91, 70, generator=gen).t()  # a transposed view: strides, not copies
    u, low = torch.randn(37, 3, generator=gen), torch.randn(91, 3, generator=gen).t()
    bias = torch.randn(91, generator=gen)
    assert_matches(matmul_lowrank(a, b, u, low, bias), a @ b + u @ low + bias, torch.float32, "C")
    assert_matches(matmul_lowrank(a, b), a @ b, torch.float32, "C without low rank")


def test_lora_branch_dtype_is_the_same_in_kernel_and_reference():
    """bf16 activations with fp32 adapters, no autocast: both paths run the LoRA branch in bf16 (the
    compute dtype), so they agree to bf16 rounding of one output, far tighter than branch-dtype differences."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 64, generator=gen).to(torch.bfloat16)
    w = (torch.randn(48, 64, generator=gen) * 0.125).to(torch.bfloat16)
    a, b = torch.randn(8, 64, generator=gen) * 0.125, torch.randn(48, 8, generator=gen) * 0.5
    ref = reference_lora_linear(x, w, None, a, b, 2.0)
    for gemm in ("cublas", "triton"):
        got = lora_linear(x, w, None, a, b, 2.0, gemm=gemm)
        assert got.dtype == ref.dtype == torch.bfloat16
        diff = (got.float() - ref.float()).abs()
        assert float(diff.max()) <= 2 ** -7 * float(ref.float().abs().max()), gemm


def test_lora_autotune_buckets_the_token_count():
    from offsite_ds.kernels.lora_linear import _autotuned, m_bucket

    assert _autotuned().keys == ["M_BUCKET", "N", "K", "R"]
    assert [m_bucket(m) for m in (1, 1000, 1024, 1025, 10 ** 6)] == [1, 1024, 1024, 2048, 16384]


def test_cross_entropy_backward_scales_in_fp32():
    """Gradient accumulation over 3 micro-batches scales the loss by 1/3: the scale must not be rounded to
    bf16 (0.33398, a +0.2% bias on every gradient element); and a scale of 1 returns the saved gradient."""
    gen = torch.Generator().manual_seed(12)
    hidden = leaf(torch.randn(64, 32, generator=gen), torch.bfloat16)
    weight = (torch.randn(300, 32, generator=gen) * 0.3).to(torch.bfloat16)
    targets = torch.randint(0, 300, (64,), generator=gen)
    (linear_cross_entropy(hidden, weight, targets) / 3).backward()
    scaled = hidden.grad.float()
    hidden.grad = None
    linear_cross_entropy(hidden, weight, targets).backward()
    plain = hidden.grad.float()
    mask = plain.abs() > 1e-4
    ratio = float((scaled[mask] / plain[mask]).mean() * 3)
    assert abs(ratio - 1) < 5e-4, f"gradient scaled by {ratio / 3:.6f}, not 1/3"


def test_frozen_head_cast_is_cached_until_the_weight_changes():
    from offsite_ds.kernels.linear_cross_entropy import cast_frozen

    weight = torch.randn(50, 8)
    first = cast_frozen(weight, torch.bfloat16)
    assert cast_frozen(weight, torch.bfloat16) is first, "the same frozen weight is cast once"
    with torch.no_grad():
        weight.add_(1.0)  # e.g. a checkpoint loaded into it: _version moves
    second = cast_frozen(weight, torch.bfloat16)
    assert second is not first and torch.equal(second, weight.to(torch.bfloat16))
    assert cast_frozen(weight, torch.float32) is weight, "no cast, no copy"
