"""patch/unpatch on tiny real-architecture emulators: same losses and gradients, state dict untouched,
probes refuse modules whose maths differs, attention through SDPA (and a stand-in flash-attn), and the
convergence check: tiny OPT and BLOOM emulators trained 20 steps patched and unpatched agree.

The Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1).
"""
import copy
import importlib
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import offsite_ds.attention as attention
from offsite_ds.emulator import build_emulator
from offsite_ds.errors import OffsiteError
from offsite_ds.families import family_of, get_path
from offsite_ds.kernels import (PARTS, kernels_enabled, kernels_for_training, patch, patch_for_training, patched,
                               resolve_kernels, unpatch)
from offsite_ds.peft_modes import apply_mode
from offsite_ds.sandwich import Layout
from offsite_ds.tiny import byte_tokenizer, tiny_model

TEXT = ("the quick brown fox jumps over the lazy dog . a stitch in time saves nine . "
        "all that glitters is not gold . the early bird catches the worm . ") * 6


def emulator(family: str, mode: str = "full", layout: str = "1-2-1", n_layers: int = 6):
    """A data owner's emulator of a tiny random model: adapter blocks trainable, the rest frozen."""
    full = tiny_model(family, n_layers=n_layers)
    lay = Layout.parse(layout, n_layers)
    emu, _ = build_emulator(full, lay)
    apply_mode(emu, lay.adapter_positions, mode)
    return emu


def batch(seq_len: int = 24, rows: int = 2, offset: int = 0):
    ids = byte_tokenizer()(TEXT)["input_ids"]
    blocks = [ids[offset + i * seq_len: offset + (i + 1) * seq_len] for i in range(rows)]
    input_ids = torch.tensor(blocks)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def loss_and_grads(model, data):
    model.zero_grad(set_to_none=True)
    out = model(**data)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


EXPECTED = {
    "opt": {"layer_norm", "linear+bias+relu", "linear_cross_entropy (frozen head)"},
    "bloom": {"layer_norm", "linear+bias+gelu_tanh", "linear_cross_entropy (frozen head)"},
    "gpt2": {"layer_norm", "linear+bias+gelu_tanh", "linear_cross_entropy (frozen head)"},
    "llama": {"rms_norm", "linear_cross_entropy (frozen head)"},
    "gpt_neox": {"layer_norm", "linear+bias+gelu", "linear_cross_entropy (frozen head)"},
    "phi": {"layer_norm", "linear+bias+gelu_tanh", "linear_cross_entropy (frozen head)"},
    "gptj": {"layer_norm", "linear+bias+gelu_tanh", "linear_cross_entropy (frozen head)"},
    "falcon": {"layer_norm", "linear_cross_entropy (frozen head)"},  # its MLP linears have no bias
    "gpt_bigcode": {"layer_norm", "linear+bias+gelu_tanh", "linear_cross_entropy (frozen head)"},
    "mpt": {"layer_norm", "linear_cross_entropy (frozen head)"},  # no biases
    "codegen": {"layer_norm", "linear+bias+gelu_tanh", "linear_cross_entropy (frozen head)"},
}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_patch_keeps_loss_gradients_and_state_dict(family):
    model = emulator(family)
    model.train()
    data = batch()
    names = list(model.state_dict())
    ref_out, ref_grads = loss_and_grads(model, data)

    handle = patch(model, PARTS)  # every part, the fused MLP (off by default) included
    assert EXPECTED[family] <= set(handle.swapped.values()), handle.swapped
    assert handle.attention is not None
    assert list(model.state_dict()) == names, "patching must not rename or add state-dict entries"
    out, grads = loss_and_grads(model, data)
    assert out.logits is None, "the fused loss never materialises the logits"
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    assert unpatch(model) is True
    assert patched(model) is None
    assert not any("forward" in m.__dict__ for m in model.modules()), "unpatch must remove every swapped forward"
    again, _ = loss_and_grads(model, data)
    assert again.logits is not None
    torch.testing.assert_close(again.loss, ref_out.loss, rtol=1e-6, atol=1e-6)


def test_default_parts_leave_the_mlp_to_cublas():
    handle = patch(emulator("opt"))
    assert not any(k.startswith("linear+bias") for k in handle.swapped.values()), handle.swapped
    assert "layer_norm" in handle.swapped.values()


@pytest.mark.parametrize("family,gemm", [("opt", "cublas"), ("opt", "triton"), ("gpt2", "triton")])
def test_patch_fuses_peft_lora_layers(family, gemm):
    """OPT's q/v nn.Linear and GPT-2's c_attn Conv1D (fan_in_fan_out) LoRA layers."""
    model = emulator(family, mode="lora")
    with torch.no_grad():  # PEFT starts B at zero; give the low-rank path something to carry
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()
    data = batch()
    ref_out, ref_grads = loss_and_grads(model, data)
    handle = patch(model, lora_gemm=gemm)
    assert list(handle.swapped.values()).count("lora_linear") == 4 if family == "opt" else 2
    out, grads = loss_and_grads(model, data)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    unpatch(model)


def test_patch_twice_repatches_and_works_on_a_full_model():
    model = tiny_model("opt", n_layers=4)  # a full model, not an emulator: everything trainable
    data = batch()
    model.train()
    _, ref_grads = loss_and_grads(model, data)
    first = patch(model)
    second = patch(model)
    assert first.swapped == second.swapped
    assert patched(model) is second
    out, grads = loss_and_grads(model, data)
    assert out.logits is not None, "a trainable head takes the original forward (it needs logits and dW)"
    assert model.lm_head.weight.grad is not None
    assert grads.keys() == ref_grads.keys()
    for name in grads:  # the head's gradient, and every other, as without the kernels
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    unpatch(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_labels_absent_or_eval_use_the_right_path():
    model = emulator("bloom")
    patch(model)
    data = batch()
    with torch.no_grad():
        assert model(input_ids=data["input_ids"]).logits is not None, "no labels: ordinary forward (generation)"
        fused = model(**data)
    unpatch(model)
    with torch.no_grad():
        ref = model(**data)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-5, atol=1e-5)


def test_probes_refuse_modules_whose_maths_differs():
    """A Gemma-style (1 + weight) RMSNorm and a head whose logits get scaled keep their own forwards."""
    model = emulator("llama")
    norm = get_path(model, family_of(model).final_norm)

    def one_plus_weight(self, x):
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (h * (1.0 + self.weight.float())).to(x.dtype)

    norm.forward = types.MethodType(one_plus_weight, norm)
    head = model.lm_head
    head.forward = types.MethodType(lambda self, x: torch.nn.functional.linear(x, self.weight) * 0.5, head)
    handle = patch(model)
    assert "model.norm" in handle.skipped and "rsqrt" in handle.skipped["model.norm"]
    assert "lm_head" in handle.skipped and "probe mismatch" in handle.skipped["lm_head"]
    assert norm.forward.__func__ is one_plus_weight, "a refused module keeps its forward"
    out = model(**batch())
    assert out.logits is not None
    unpatch(model)
    assert norm.forward.__func__ is one_plus_weight, "unpatch must leave forwards it did not swap alone"


def test_patched_model_can_be_deep_copied_and_saved(tmp_path):
    model = emulator("gpt2")
    patch(model)
    clone = copy.deepcopy(model)
    data = batch()
    with torch.no_grad():
        torch.testing.assert_close(clone(**data).loss, model(**data).loss)
    model.save_pretrained(tmp_path / "m")
    names = json.loads((tmp_path / "m" / "config.json").read_text())["model_type"]
    assert names == "gpt2"


# ---------------------------------------------------------------- attention

def test_bloom_attention_through_sdpa_matches_eager_with_padding():
    model = tiny_model("bloom", n_layers=2)
    ids = batch()["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: ALiBi positions shift, the mask hides the pads
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        fast = attention.use_fast_attention(model)
        got = model(input_ids=ids, attention_mask=mask).logits
    assert fast.chosen == "sdpa(alibi)" and len(fast.patched_modules) == 2
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)
    fast.undo()
    assert model.config._attn_implementation == "eager"
    assert not any("forward" in m.__dict__ for m in model.modules())


def _reference_flash(q, k, v, dropout_p, softmax_scale, causal, alibi_slopes):
    """Stand-in with flash-attn's documented semantics: [B, S, H, D], bias -slope*|i-j|, causal."""
    assert causal and dropout_p == 0.0
    pos = torch.arange(q.shape[1])
    bias = -alibi_slopes[:, None, None] * (pos[:, None] - pos[None, :]).abs().float()
    bias = bias.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * softmax_scale + bias
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float()).to(q.dtype)


def test_bloom_flash_path_converts_layout_and_alibi(monkeypatch):
    """flash-attn is not installed here: a stand-in with its semantics checks our call (layout, slopes,
    scale, causal); the padding hook must route padded batches to SDPA."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        return _reference_flash(*args, **kwargs)

    monkeypatch.setattr(attention, "_flash_func", fake)
    monkeypatch.setattr(attention, "flash_can_run", lambda q: True)
    model = tiny_model("bloom", n_layers=2)
    ids = batch()["input_ids"]
    full = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=full).logits
        fast = attention.use_fast_attention(model)
        got = model(input_ids=ids, attention_mask=full).logits
        assert len(calls) == 2
        padded = full.clone()
        padded[0, :3] = 0
        model(input_ids=ids, attention_mask=padded)
        assert len(calls) == 2, "a padded batch must not take the flash path"
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    fast.undo()


def test_attention_choice_for_models_with_hf_support():
    model = tiny_model("opt", n_layers=2)
    model.set_attn_implementation("eager")
    fast = attention.use_fast_attention(model)
    assert fast.chosen == "sdpa" and model.config._attn_implementation == "sdpa"
    fast.undo()
    assert model.config._attn_implementation == "eager"


# ---------------------------------------------------------------- --kernels auto|on|off

def test_kernels_enabled_choices():
    assert kernels_enabled("off") is False
    assert kernels_enabled("auto") is False, "auto never picks the interpreter (a debugging aid), GPU or not"
    assert kernels_enabled("on") is True  # the interpreter is active in tests
    with pytest.raises(OffsiteError, match="choose auto, ours, liger, cce, off"):
        kernels_enabled("sometimes")
    assert resolve_kernels("ours") == resolve_kernels("on") == "ours"
    if not torch.cuda.is_available():
        for lib, package in (("liger", "liger-kernel"), ("cce", "cut-cross-entropy")):
            with pytest.raises(OffsiteError, match=f"--kernels {lib}: {package} runs on CUDA only"):
                resolve_kernels(lib)


def test_auto_prefers_the_measured_library_kernels(monkeypatch):
    """On a GPU, auto takes the first importable of AUTO_ORDER (libraries until ours is measured faster)."""
    patch_module = importlib.import_module("offsite_ds.kernels.patch")

    monkeypatch.setattr(patch_module, "INTERPRETING", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(patch_module, "library_available", lambda name: name == "liger")
    assert patch_module.AUTO_ORDER[0] != "ours" and resolve_kernels("auto") == "liger"
    monkeypatch.setattr(patch_module, "library_available", lambda name: False)
    assert resolve_kernels("auto") == "off"
    with pytest.raises(OffsiteError, match="pip install cut-cross-entropy"):
        resolve_kernels("cce")


def test_library_loss_is_swapped_in_and_called(monkeypatch):
    """--kernels liger|cce: the loss goes through the library's fused linear CE (stubbed here: both need
    CUDA); the rest of the model stays eager."""
    patch_module = importlib.import_module("offsite_ds.kernels.patch")
    from offsite_ds.kernels import reference_linear_cross_entropy

    calls = []

    def fake(name, hidden, weight, targets, bias=None, ignore_index=-100, reduction="mean"):
        calls.append(name)
        return reference_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                              bias, ignore_index, reduction)

    monkeypatch.setattr(patch_module, "library_linear_cross_entropy", fake)
    model = emulator("llama")
    model.train()
    data = batch()
    ref, _ = loss_and_grads(model, data)
    handle = patch(model, ("loss",), loss_impl="cce")
    assert set(handle.swapped.values()) == {"cut-cross-entropy linear cross-entropy (frozen head)"}
    out, _ = loss_and_grads(model, data)
    assert calls == ["cce"] and out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    unpatch(model)


def test_without_gpu_or_interpreter_the_reference_path_runs():
    code = (
        "import torch\n"
        "from offsite_ds.errors import OffsiteError\n"
        "from offsite_ds.kernels import kernels_enabled, linear_cross_entropy, reference_linear_cross_entropy\n"
        "from offsite_ds.kernels.runtime import INTERPRETING, choose_backend\n"
        "assert not INTERPRETING and choose_backend('auto', torch.zeros(1)) == 'reference'\n"
        "h, w, y = torch.randn(5, 8), torch.randn(30, 8), torch.randint(0, 30, (5,))\n"
        "assert torch.equal(linear_cross_entropy(h, w, y), reference_linear_cross_entropy(h, w, y))\n"
        "assert kernels_enabled('auto') is False\n"
        "try:\n"
        "    kernels_enabled('on')\n"
        "except OffsiteError as exc:\n"
        "    print('refused:', exc)\n"
        "else:\n"
        "    raise SystemExit('--kernels on must refuse without CUDA or the interpreter')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}  # a CPU-only machine, GPU or not
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused: --kernels on" in result.stdout and "no CUDA GPU" in result.stdout


# ---------------------------------------------------------------- convergence: 20 steps patched vs unpatched

def train_losses(family: str, kernels: bool, steps: int = 20, mode: str = "full") -> list[float]:
    torch.manual_seed(0)
    model = emulator(family, mode=mode)
    model.train()
    if kernels:
        patch(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    losses = []
    for step in range(steps):
        data = batch(seq_len=24, rows=2, offset=(step * 7) % 120)
        opt.zero_grad(set_to_none=True)
        loss = model(**data).loss
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    return losses


@pytest.mark.parametrize("family,mode", [("opt", "full"), ("bloom", "full"), ("opt", "lora")])
def test_mini_model_convergence_patched_matches_unpatched(family, mode):
    eager = train_losses(family, kernels=False, mode=mode)
    fused = train_losses(family, kernels=True, mode=mode)
    # frozen random head and final norm: a tiny emulator cannot go far, but it must move
    assert eager[-1] < eager[0] - 0.1, f"the tiny emulator must learn: {eager[0]:.3f} -> {eager[-1]:.3f}"
    for step, (a, b) in enumerate(zip(eager, fused)):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), f"step {step}: eager {a:.6f} vs patched {b:.6f}"


# ---------------------------------------------------------------- through the data owner's `tune`

@pytest.mark.parametrize("family,mode", [("opt", "lora"), ("bloom", "full")])
def test_tune_with_kernels_on_matches_kernels_off(family, mode, tiny_bundle, corpus_file, tmp_path):
    """`tune --kernels on` (the Triton kernels, here interpreted) follows `--kernels off` step by step."""
    from offsite_ds.roles.tune_adapter import tune
    from offsite_ds.train import TrainConfig

    bundle = tiny_bundle(family)
    history = {}
    for kernels in ("off", "on"):
        torch.manual_seed(0)  # LoRA's initialisation draws from the global generator
        # CPU and fp32 on any machine: the interpreted kernels are compared on CPU tensors at fp32 tolerance
        cfg = TrainConfig(steps=4, lr=3e-3, batch_size=2, seed=0, log_every=1, device="cpu", precision="fp32")
        summary = tune(bundle, corpus_file, tmp_path / f"out-{kernels}", mode=mode, cfg=cfg, seq_len=32,
                       kernels=kernels)
        history[kernels] = [h["loss"] for h in summary["loss_history"]]
    assert len(history["on"]) == 4
    for step, (a, b) in enumerate(zip(history["off"], history["on"])):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), f"step {step}: off {a:.6f} vs on {b:.6f}"


def test_zero3_with_kernels_is_refused_or_skipped(tiny_bundle, corpus_file, tmp_path, capsys):
    """ZeRO-3 partitions the weights the fused loss/LoRA kernels read outside their modules: `tune --kernels on`
    refuses before any work, auto leaves the model alone and says so."""
    from offsite_ds.roles.tune_adapter import tune
    from offsite_ds.train import TrainConfig

    bundle = tiny_bundle("opt", "1-1-1")
    master = os.environ.get("MASTER_ADDR")
    cfg = TrainConfig(steps=1, batch_size=2, deepspeed={"zero_optimization": {"stage": 3}})
    with pytest.raises(OffsiteError, match="--kernels on cannot run under ZeRO-3"):
        tune(bundle, corpus_file, tmp_path / "out", cfg=cfg, seq_len=32, kernels="on")
    assert not (tmp_path / "out").exists()
    from offsite_ds.cli import main

    rc = main(["tune", str(bundle), "--data", str(corpus_file), "--out", str(tmp_path / "out"), "--kernels", "on",
               "--deepspeed", "zero3", "--steps", "1", "--seq-len", "32", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cannot run under ZeRO-3" in err and "\n" not in err
    assert "MASTER_ADDR" not in os.environ or os.environ["MASTER_ADDR"] == master, "refused before any set-up"
    assert kernels_for_training("on", zero3=False) == "ours" and kernels_for_training("off", zero3=True) == "off"
    model = emulator("opt")
    assert patch_for_training(model, "ours") is not None
    unpatch(model)
    assert patch_for_training(model, "off") is None and patched(model) is None


def test_bloom_bias_is_shared_across_an_unpadded_batch(monkeypatch):
    """Without padding every row has the same ALiBi + causal bias: SDPA gets [1, heads, q, kv], not B x ..."""
    model = tiny_model("bloom", n_layers=2)
    data = batch(rows=3)
    with torch.no_grad():
        ref = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    shapes = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        shapes.append(tuple(attn_mask.shape))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    fast = attention.use_fast_attention(model)
    with torch.no_grad():
        got = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    assert shapes and all(s[0] == 1 for s in shapes), shapes
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    fast.undo()


def test_flash_attention_is_chosen_when_the_model_reaches_cuda(monkeypatch):
    """patch() often runs while the model is still on CPU: flash-attn must still be picked at the first
    forward on CUDA (simulated: flash-attn and CUDA are not here)."""
    model = tiny_model("opt", n_layers=2)
    monkeypatch.setattr(attention, "_flash_func", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fast = attention.use_fast_attention(model)
    assert fast.chosen == "sdpa" and len(fast.hooks) == 1
    chosen = []
    monkeypatch.setattr(model, "set_attn_implementation", lambda name: chosen.append(name))
    ids = batch()["input_ids"]
    with torch.no_grad():
        model(input_ids=ids)  # still on CPU: nothing changes
        assert chosen == []
        monkeypatch.setattr(attention, "_model_device", lambda m: torch.device("cuda"))
        model(input_ids=ids)
        model(input_ids=ids)
    assert chosen == ["flash_attention_2"] and fast.chosen == "flash_attention_2" and not fast.hooks
