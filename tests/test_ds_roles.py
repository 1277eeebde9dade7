"""The owner's roles in one process: the distillation plumbing per family, LoRA merging, refusals, the CLI."""
import json

import pytest
import torch

from offsite_ds.bundle import load_bundle
from offsite_ds.emulator import make_bundle
from offsite_ds.errors import ArtifactError, OffsiteError
from offsite_ds.evaluate import logit_kl
from offsite_ds.roles.distill import build_distill_model, kd_loss
from offsite_ds.peft_modes import lora_layers, merge_lora_state
from offsite_ds.tiny import save_tiny_model, tiny_model


def test_kd_loss_is_mse_over_teacher_mean_square():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    expected = torch.nn.functional.mse_loss(s, t) / t.pow(2).mean()
    assert torch.allclose(kd_loss(s, t), expected)
    assert kd_loss(t, t) == 0
    assert torch.allclose(kd_loss(7 * s, 7 * t), kd_loss(s, t))  # scale-free across models
    mask = torch.ones(2, 5)
    mask[:, -2:] = 0
    assert torch.allclose(kd_loss(s, t, mask), kd_loss(s[:, :3], t[:, :3]))


def test_per_token_kd_weighs_every_token_alike_and_logit_kl_is_a_divergence():
    torch.manual_seed(0)
    t = torch.randn(1, 4, 8)
    t[:, 0] *= 1000  # an attention sink: global normalisation is all about it, per-token is not
    s = t.clone()
    s[:, 1:] += torch.randn(1, 3, 8)
    assert kd_loss(s, t) < 1e-5
    per_token = ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1)).mean()
    assert torch.allclose(kd_loss(s, t, norm="token"), per_token) and per_token > 0.1
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert torch.allclose(kd_loss(s, t, mask, "token"), kd_loss(s[:, :2], t[:, :2], norm="token"))
    a, b = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    assert logit_kl(a, a) < 1e-6 < logit_kl(a, b)
    assert torch.allclose(logit_kl(a, a + 5.0), torch.tensor(0.0), atol=1e-6)  # a shift is the same distribution
    ref = torch.nn.functional.kl_div(torch.log_softmax(a, -1).flatten(0, 1), torch.log_softmax(b, -1).flatten(0, 1),
                                     log_target=True, reduction="batchmean")
    assert torch.allclose(logit_kl(a, b), ref, atol=1e-6)


def test_logit_kd_teacher_logits_are_the_full_models(tiny_model_dir, tiny_bundle):
    """The teacher pass runs the emulator's outer parts on the teacher middle's output: exactly the full model."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("llama")
    bundle = tiny_bundle("llama")
    model = build_distill_model(model_dir, bundle, load_bundle(bundle).manifest, None, 30.0, 1.0, logit_weight=2.0)
    ids = torch.randint(0, 256, (2, 16))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        full = AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids, attention_mask=mask).logits
        student = model.emulator(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(out["logit_kl"], logit_kl(student, full, mask), atol=1e-5) and out["logit_kl"] > 0
    assert torch.allclose(out["loss"], out["lm_loss"] + 30.0 * out["kd_loss"] + 2.0 * out["logit_kl"], atol=1e-5)


@pytest.mark.parametrize("family", ["bloom", "llama"])
def test_chunked_head_losses_equal_the_whole_logits_losses_in_value_and_gradient(family, tiny_model_dir, tiny_bundle,
                                                                                 monkeypatch):
    """LM and logit-KL go through the head five rows at a time (no logits held whole): the losses and every
    student gradient must be those of HF's loss and logit_kl on whole logits."""
    import functools

    from transformers import AutoModelForCausalLM

    from offsite_ds.evaluate import head_loss
    from offsite_ds.roles import distill

    monkeypatch.setattr(distill, "head_loss", functools.partial(head_loss, chunk_bytes=5 * 4 * 256))
    model_dir, bundle = tiny_model_dir(family), tiny_bundle(family)
    model = build_distill_model(model_dir, bundle, load_bundle(bundle).manifest, None, 0.0, 0.7, logit_weight=2.0)
    ids = torch.randint(0, 256, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out["loss"].backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with torch.no_grad():
        full = AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids, attention_mask=mask).logits
    whole = model.emulator(input_ids=ids, attention_mask=mask, labels=ids)
    kl = logit_kl(whole.logits, full, mask)
    (0.7 * whole.loss + 2.0 * kl).backward()
    assert torch.allclose(out["lm_loss"], whole.loss, atol=1e-5) and torch.allclose(out["logit_kl"], kl, atol=1e-5)
    assert torch.allclose(out["loss"], 0.7 * whole.loss + 2.0 * kl, atol=1e-5)
    assert chunked and set(chunked) == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in chunked.items():
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("family", ["opt", "bloom", "gpt2", "llama"])
def test_teacher_sees_the_students_input_with_its_arguments(family, tiny_model_dir, tiny_bundle):
    """Keeping the whole middle makes the student a copy of the teacher: KD must be exactly 0 and the LM
    loss the full model's own - which holds only if the teacher got the same hidden states, mask,
    positions (rotary, ALiBi) the model passed its blocks."""
    model_dir = tiny_model_dir(family)
    bundle = tiny_bundle(family, "2-4-2")
    model = build_distill_model(model_dir, bundle, load_bundle(bundle).manifest, None, 30.0, 1.0)
    ids = torch.randint(0, 256, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the mask must reach the teacher too
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        from transformers import AutoModelForCausalLM

        full = AutoModelForCausalLM.from_pretrained(model_dir)
        reference = full(input_ids=ids, attention_mask=mask, labels=ids).loss
    assert float(out["kd_loss"]) == 0.0
    assert torch.allclose(out["lm_loss"], reference, atol=1e-6)
    assert len(model.teacher) == 4 and len(model.student) == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".2." in n or ".3." in n or ".4." in n or ".5." in n for n in trainable)
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_layer_drop_student_differs_from_teacher(tiny_model_dir, tiny_bundle):
    model_dir = tiny_model_dir("opt")
    bundle = tiny_bundle("opt")
    model = build_distill_model(model_dir, bundle, load_bundle(bundle).manifest, None, 30.0, 1.0)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    assert float(out["kd_loss"]) > 0
    assert torch.allclose(out["loss"], out["lm_loss"] + 30.0 * out["kd_loss"])


def test_a_bundle_from_another_model_is_refused(tiny_model_dir, tmp_path):
    other = save_tiny_model("opt", tmp_path / "other", n_layers=8, seed=1)
    bundle = make_bundle(other, "2-2-2", tmp_path / "bundle", select="uniform", calib_data=None).path
    with pytest.raises(ArtifactError, match="differs from the full model"):
        build_distill_model(tiny_model_dir("opt"), bundle, load_bundle(bundle).manifest, None, 30.0, 1.0)
    deeper = save_tiny_model("opt", tmp_path / "deeper", n_layers=10)
    with pytest.raises(ArtifactError, match="8-block opt model"):
        build_distill_model(deeper, bundle, load_bundle(bundle).manifest, None, 30.0, 1.0)


@pytest.mark.parametrize("family", ["opt", "gpt2"])  # gpt2: Conv1D, fan_in_fan_out
def test_merging_lora_in_the_state_dict_matches_the_lora_model(family):
    from offsite_ds.manifests import LoraSettings
    from offsite_ds.peft_modes import apply_mode

    model = tiny_model(family, n_layers=3)
    base = tiny_model(family, n_layers=3)
    apply_mode(model, [0, 1, 2], "lora", LoraSettings(r=2))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # B starts at zero; make the update visible
    merged = merge_lora_state({k: v.clone() for k, v in model.state_dict().items()}, lora_layers(model))
    assert set(merged) == set(base.state_dict())
    base.load_state_dict(merged)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.allclose(base(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(base(input_ids=ids).logits, tiny_model(family, n_layers=3)(input_ids=ids).logits)


def test_cli_distill_one_process_with_eval(tiny_model_dir, tiny_bundle, corpus_file, tmp_path, capsys):
    from offsite_ds.cli import main

    bundle = tiny_bundle("bloom")
    rc = main(["distill", str(tiny_model_dir("bloom")), "--bundle", str(bundle), "--data", str(corpus_file),
               "--eval-data", str(corpus_file), "--max-eval-blocks", "4", "--eval-every", "3", "--out",
               str(tmp_path / "distilled"), "--steps", "6", "--seq-len", "32", "--batch-size", "2", "--warmup", "0",
               "--lr", "1e-3", "--no-progress", "--summary-json", str(tmp_path / "summary.json")])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["best_eval_loss"] is not None
    distilled = load_bundle(tmp_path / "distilled")
    record = distilled.manifest.compression.distillation
    assert distilled.manifest.compression.distilled is True
    assert record["steps"] == 6 and record["tokens"] == 6 * 2 * 32 and record["final_kd_loss"] > 0
    assert record["eval"]["eval_kd_loss"] > 0 and record["data_fingerprint"]
    assert "distilled emulator bundle" in capsys.readouterr().out


def test_cli_refuses_bad_weights(tiny_model_dir, tiny_bundle, corpus_file, tmp_path, capsys):
    from offsite_ds.cli import main

    bundle = tiny_bundle("opt")
    rc = main(["distill", str(tiny_model_dir("opt")), "--bundle", str(bundle), "--data", str(corpus_file),
               "--out", str(tmp_path / "d"), "--kd-weight", "0", "--lm-weight", "0"])
    assert rc == 2 and "must be >= 0 and finite, not all 0" in capsys.readouterr().err
    rc = main(["distill", str(tiny_model_dir("opt")), "--bundle", str(bundle), "--data", str(corpus_file),
               "--out", str(tmp_path / "d"), "--logit-weight", "nan"])
    err = capsys.readouterr().err
    assert rc == 2 and "--logit-weight nan" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(OffsiteError, match="no config.json"):
        from offsite_ds.roles.finetune_full import finetune

        finetune(tmp_path, corpus_file, tmp_path / "ft")


def test_activation_checkpointing_changes_nothing_but_memory(tiny_model_dir, tiny_bundle):
    """The student's hooks fire again during recomputation; the gradients must not notice."""
    model_dir = tiny_model_dir("llama")
    bundle = tiny_bundle("llama")
    manifest = load_bundle(bundle).manifest
    ids = torch.randint(0, 256, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = build_distill_model(model_dir, bundle, manifest, None, 30.0, 1.0, gradient_checkpointing=checkpointing)
        model.train()
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)["loss"].backward()
        grads.append([p.grad.clone() for p in model.student.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
