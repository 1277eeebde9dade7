"""Perplexity scored from hidden states through the head in chunks equals the full-logits computation."""
import pytest
import torch
import torch.nn.functional as F

from conftest import FAMILIES
from offsite_ds.evaluate import _windows, head_kl, head_nll, logit_kl, token_nll
from offsite_ds.tiny import tiny_model


@torch.no_grad()
def _full_logits_nll(model, ids, seq_len, stride):
    """Today's recipe before chunking: the model's own logits, all of them, fp32 cross-entropy."""
    nll, count, prev = 0.0, 0, 0
    for begin, end, scored in _windows(ids.numel(), seq_len, stride):
        inputs = ids[begin:end][None]
        labels = inputs.clone()
        labels[0, : end - begin - scored] = -100
        logits = model(input_ids=inputs).logits[:, :-1].float()
        nll += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                     ignore_index=-100, reduction="sum"))
        count += int((labels[:, 1:] != -100).sum())
    return nll, count


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_head_equals_full_logits(family, monkeypatch):
    import offsite_ds.evaluate as ev

    model = tiny_model(family, n_layers=2)
    ids = torch.randint(0, 256, (150,))
    monkeypatch.setattr(ev, "CHUNK_BYTES", 258 * 4 * 7)  # 7 rows per chunk: many chunks
    monkeypatch.setattr(ev, "MIN_CHUNK_ROWS", 1)
    nll, count = token_nll(model, ids, seq_len=40, stride=25, batch_size=2)
    ref_nll, ref_count = _full_logits_nll(model, ids, 40, 25)
    assert count == ref_count
    assert nll == pytest.approx(ref_nll, rel=1e-5)


def test_head_nll_applies_the_family_logit_transform():
    head = torch.nn.Linear(8, 50, bias=False)
    hidden, targets = torch.randn(30, 8), torch.randint(0, 50, (30,))
    targets[::4] = -100
    cap = lambda logits: torch.tanh(logits / 0.5) * 0.5  # noqa: E731 (Gemma-2 style soft-capping)
    ref = F.cross_entropy(cap(head(hidden).float()), targets, ignore_index=-100, reduction="sum")
    assert head_nll(hidden, targets, head, cap, chunk_bytes=50 * 4 * 3) == pytest.approx(float(ref), rel=1e-6)


def test_lm_eval_batch_is_capped_so_its_logits_fit():
    from offsite_ds.lm_eval_bridge import HFLM_LOGITS_BUDGET, fitting_batch_size

    model = tiny_model("llama", n_layers=1, vocab=262_144)
    assert fitting_batch_size(model, 4, 2048) == 1  # 4.3 GB of logits per 2048-token sequence
    assert fitting_batch_size(model, 4, 128) == 4
    assert fitting_batch_size(model, 64, 256) == HFLM_LOGITS_BUDGET // (8 * 262_144 * 256)


@pytest.mark.parametrize("transform", [None, lambda x: 30 * torch.tanh(x / 30)], ids=["plain", "soft-capped"])
def test_head_kl_equals_the_full_logits_kl_in_value_and_gradient(transform):
    """Chunks of 3 rows out of 2 x 7 (the last chunk short): the same loss and student gradient as logit_kl on
    all logits at once, with and without a family's logit transform; no gradient path gives the same value."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 16, generator=g))
    teacher = torch.randn(2, 7, 16, generator=g)
    student = (teacher + 0.5 * torch.randn(2, 7, 16, generator=g)).requires_grad_(True)
    tf = transform or (lambda x: x)
    full = logit_kl(tf(head(student).float()), tf(head(teacher).float()))
    (want,) = torch.autograd.grad(full, student)
    chunked = head_kl(student, teacher, head, transform, chunk_bytes=3 * 4 * 50)
    (got,) = torch.autograd.grad(2.0 * chunked, student)  # an outer factor reaches the stored gradient
    assert torch.allclose(chunked, full, rtol=1e-5) and torch.allclose(got, 2.0 * want, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        assert torch.allclose(head_kl(student, teacher, head, transform, chunk_bytes=3 * 4 * 50), full, rtol=1e-5)


def test_head_kl_refuses_a_trainable_head():
    head = torch.nn.Linear(4, 5)
    with pytest.raises(ValueError, match="freeze the head"):
        head_kl(torch.randn(3, 4, requires_grad=True), torch.randn(3, 4), head)


def test_default_chunks_are_never_thinner_than_min_chunk_rows(monkeypatch):
    """A product of a few rows by a large vocabulary runs slowly: the default chunk has at least MIN_CHUNK_ROWS rows
    even where CHUNK_BYTES would allow fewer; an explicit chunk_bytes is taken as given."""
    import offsite_ds.evaluate as ev

    head = torch.nn.Linear(4, 1000, bias=False).requires_grad_(False)
    calls = []
    head.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    monkeypatch.setattr(ev, "CHUNK_BYTES", 4 * 1000 * 10)  # 10 rows
    monkeypatch.setattr(ev, "MIN_CHUNK_ROWS", 64)
    hidden, targets = torch.randn(150, 4), torch.randint(0, 1000, (150,))
    head_nll(hidden, targets, head)
    assert calls == [64, 64, 22]
    calls.clear()
    head_nll(hidden, targets, head, chunk_bytes=4 * 1000 * 50)
    assert calls == [50, 50, 50]
