"""The default recipe on tiny random models of many Hugging Face architectures: does it run end to end?

    python experiments/architecture_sweep.py OUT [MODEL_TYPE ...]

For each model type: a 10-block random model (hidden 64, the byte-level tokenizer of offsite_ds.tiny; the
families offsite_ds.tiny knows use its configs, others transformers' defaults shrunk), then the four commands a
new user runs, each in its own process: `emulate MODEL --layout 2-4-2` (every other option at its default: the
importance selection on the shipped public sample, the fit, the guard), `tune BUNDLE --data CORPUS --steps 10
--seq-len 64`, `plugin MODEL ADAPTER`, `eval PLUGGED --data CORPUS`. Writes OUT/results.json and OUT/results.md
(per type: seconds per stage, or the stage that failed and the last line it printed) and each type's log.
Random weights: this checks that the code paths run and what they refuse, not the quality of anything.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from offsite_ds.tiny import TINY_FAMILIES, byte_tokenizer, tiny_config

TYPES = ["llama", "mistral", "ministral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "phi", "gpt_neox",
         "falcon", "olmo", "olmo2", "olmo3", "granite", "stablelm", "starcoder2", "gptj", "smollm3", "cohere", "opt",
         "bloom", "gpt2", "gpt_bigcode", "codegen", "mpt", "exaone4", "glm", "glm4", "helium", "apertus", "arcee",
         "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "granitemoe", "phimoe", "qwen3_next", "deepseek_v3",
         "gemma3n_text", "lfm2"]
V = 258
# shrunk sizes under every name a config may use; only the names a type's config has are passed
SIZES = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=10, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, n_embd=64, n_layer=10, n_head=4, d_model=64, n_layers=10, n_heads=4,
             max_position_embeddings=1024, n_positions=1024, rotary_dim=8, moe_intermediate_size=64, num_experts=4,
             num_local_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=64, pad_token_id=V - 1,
             bos_token_id=V - 2, eos_token_id=V - 2, tie_word_embeddings=True, ffn_dim=128, n_inner=128)
# DeepSeek-V3's multi-head latent attention: its own head sizes (head_dim is the rotary part), one expert group
SIZES_BY_TYPE = {"deepseek_v3": dict(n_routed_experts=4, n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16,
                                     qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
                                     num_key_value_heads=4, first_k_dense_replace=1),
                 # Qwen3-Next's linear-attention (gated delta rule) layers: their own head counts and sizes; at the
                 # defaults (32 x 128) the tiny model's steps took 10 s on transformers' PyTorch fallback
                 "qwen3_next": dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                                    linear_value_head_dim=16)}


def config_of(model_type: str):
    if model_type in TINY_FAMILIES:
        return tiny_config(model_type, n_layers=10, hidden=64, max_positions=1024)
    defaults = AutoConfig.for_model(model_type)
    sizes = {k: v for k, v in SIZES.items() if hasattr(defaults, k)} | SIZES_BY_TYPE.get(model_type, {})
    if getattr(defaults, "sliding_window", None):
        sizes["sliding_window"] = 32
    if hasattr(defaults, "num_kv_shared_layers"):
        sizes["num_kv_shared_layers"] = 0
    return AutoConfig.for_model(model_type, **sizes)


def run(args: list[str], log) -> tuple[int, str, float]:
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "offsite_ds", *args], capture_output=True, text=True, timeout=1800)
    log.write(f"$ offsite-ds {' '.join(args)}\n{done.stdout}\n{done.stderr}\n")
    return done.returncode, done.stderr, time.time() - start


def main(out: Path, types: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join("the quick brown fox jumps over the lazy dog . a stitch in time saves nine ."
                                for _ in range(400)))
    rows = []
    for model_type in types:
        work = out / model_type
        work.mkdir(exist_ok=True)
        row: dict = {"type": model_type}
        with open(work / "log.txt", "w") as log:
            try:
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(config_of(model_type))
                model.save_pretrained(work / "model")
                byte_tokenizer().save_pretrained(work / "model")
                del model
            except Exception as exc:  # noqa: BLE001 - a type this transformers cannot build at toy size
                row.update(stage="build", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                rows.append(row)
                print(row, flush=True)
                continue
            m, b, a, p = (str(work / d) for d in ("model", "bundle", "adapter", "plugged"))
            for stage, args in (("emulate", ["emulate", m, "--layout", "2-4-2", "--no-progress", "--out", b]),
                                ("tune", ["tune", b, "--data", str(corpus), "--out", a, "--steps", "10",
                                          "--seq-len", "64"]),
                                ("plugin", ["plugin", m, a, "--out", p]),
                                ("eval", ["eval", p, "--data", str(corpus)])):
                rc, stderr, seconds = run(args, log)
                row[stage] = round(seconds, 1)
                if rc:
                    last = (stderr.strip().splitlines() or [""])[-1]
                    row.update(stage=stage, error=last[:400], traceback="Traceback (most recent call last)" in stderr)
                    break
        rows.append(row)
        print(row, flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| model type | result | emulate s | tune s | plugin s | eval s |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        result = "runs" if "error" not in r else (f"{r['stage']}: {'TRACEBACK ' if r.get('traceback') else ''}"
                                                  f"{r['error']}").replace("|", "/")
        lines.append(f"| {r['type']} | {result} | " + " | ".join(str(r.get(s, "-")) for s in
                                                             ("emulate", "tune", "plugin", "eval")) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or TYPES)
