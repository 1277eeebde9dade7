"""Peak RSS and wall time of the owner's commands (emulate, plugin) and of `eval`, before and after streaming.

    python benchmarks/owner_memory.py --out benchmarks/results/2026-11-23-owner-memory-cpu
    python benchmarks/owner_memory.py --skip owner,eval --out DIR   # the calibrated builders only

The `builders` case runs `emulate` with each calibrated builder (`--builders`, default importance - emulate's
default -, iterative, crash and importance with --fit) on the same synthetic checkpoint, before
(`--builders-before-ref`: the commit that still loaded the whole model in fp32 to score) and after (block
streaming), and states the target: 1.2 x (bundle + the largest input shard) + the activation cache, above the
process floor (`offsite-ds emulate --help`: Python, torch, transformers).

Builds a synthetic Llama-architecture bf16 checkpoint (TinyLlama-1.1B's shape by default, untied head,
several shards) tensor by tensor with random weights - never holding it whole - then runs each command in
its own child process under `/usr/bin/time` (peak RSS = its maximum resident set size). "Before" is the base
commit (default 09d098f) checked out in a temporary git worktree and put first on PYTHONPATH; "after"
is this tree. The eval case uses a separate 2-block model with a 262,144-token vocabulary (and the same
body with 2,048 tokens): before and after at a fixed token count small enough for the old full-logits
path to fit in RAM, and after again at 2 x 2048 tokens (4x the fixed count). The distill case runs one step of
`distill --logit-weight 1` on a 6-block model with BLOOM's 250,880-token vocabulary, before (`--distill-before-ref`:
whole logits of both models) and after (evaluate.head_loss: a chunk of rows at a time), at 4 x 512 tokens, and after
again at 4 x 2048. Everything built is deleted at the end.

    python benchmarks/owner_memory.py --skip owner,builders,eval --out DIR   # the distill case only
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from offsite_ds.shards import ShardWriter  # noqa: E402
from offsite_ds.tiny import byte_tokenizer  # noqa: E402

GB = 1e9


def build_checkpoint(out: Path, n_layers: int, hidden: int, inter: int, vocab: int, heads: int, kv_heads: int,
                     shard_bytes: int, seed: int = 0) -> int:
    """A random bf16 Llama checkpoint written shard by shard (one tensor in memory at a time); its bytes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                  num_hidden_layers=n_layers, num_attention_heads=heads,
                                  num_key_value_heads=kv_heads, max_position_embeddings=4096,
                                  tie_word_embeddings=False, bos_token_id=256, eos_token_id=256, pad_token_id=257)
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state = skeleton.state_dict()
    writer = ShardWriter(out, [(name, list(t.shape), torch.bfloat16) for name, t in state.items()], shard_bytes)
    for name, meta in state.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(meta.shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(meta.shape, generator=gen) * 0.02).to(torch.bfloat16)
        writer.add(name, tensor)
        del tensor
    writer.close()
    config.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def measure(tree: Path, args: list[str], label: str, log: Path) -> dict:
    """Run `python -m offsite_ds ARGS` with `tree` first on PYTHONPATH; its peak RSS and wall time.

    Through /usr/bin/time: a child forked straight from this (large) process would report this
    process's RSS as its own peak (Linux keeps the pre-exec high-water mark in ru_maxrss).
    """
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("TRITON_INTERPRET", None)
    stats = log.with_name("time.tmp")
    with open(log, "a") as f:
        f.write(f"\n### {label}: python -m offsite_ds {' '.join(args)}\n")
        f.flush()
        rc = subprocess.run(["/usr/bin/time", "-f", "%M %e", "-o", str(stats), sys.executable, "-m", "offsite_ds",
                             *args], env=env, stdout=f, stderr=f, cwd=str(tree)).returncode
    max_kb, wall = stats.read_text().split()[-2:]
    stats.unlink()
    row = {"label": label, "command": "offsite-ds " + " ".join(args), "rc": rc,
           "peak_rss_gb": round(int(max_kb) * 1024 / GB, 3), "wall_s": float(wall)}
    print(json.dumps(row), flush=True)
    return row


def before_tree(ref: str, where: Path) -> Path:
    if not where.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), ref], check=True,
                       stdout=subprocess.DEVNULL)
    return where


def builder_rows(args, work: Path, log: Path, facts: dict) -> list[dict]:
    """emulate's peak RSS with each calibrated builder, before and after block streaming, and the target."""
    ckpt = work / "llama-synthetic-builders"
    size = build_checkpoint(ckpt, args.layers, args.hidden, args.intermediate, args.vocab, 32, 4,
                            int(args.shard_gb * GB))
    shard = max(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    text = work / "public.txt"  # synthetic public text: enough tokens for calibration and the fit
    text.write_text(" ".join(f"the owner publishes page {i} of its public corpus ." for i in range(4000)))
    floor = measure(ROOT, ["emulate", "--help"], "process floor (emulate --help)", log)
    before = before_tree(args.builders_before_ref, work / "before-builders")
    facts["builders"] = {"checkpoint_bytes": size, "largest_shard_bytes": shard, "layout": args.builders_layout,
                         "calib_tokens": args.calib_tokens, "fit_tokens": args.fit_tokens,
                         "before_ref": args.builders_before_ref, "floor_gb": floor["peak_rss_gb"]}
    rows = [floor]
    try:
        for builder in args.builders.split(","):
            select, _, fit = builder.partition("+")
            flags = ["--select", select, "--calib-data", str(text), "--calib-tokens", str(args.calib_tokens),
                     "--allow-far"]
            if fit:  # fit: the default KL phase (rank 8 since 2026-12-06); fit-rN: rank N (fit-r0: all weights)
                flags += ["--fit", "--fit-tokens", str(args.fit_tokens), "--fit-epochs", "1"]
                flags += ["--fit-kl-rank", fit.removeprefix("fit-r")] if fit.startswith("fit-r") else []
            for when, tree in (("before", before), ("after", ROOT)):
                if when == "before" and args.builders_after_only:
                    continue
                bundle = work / f"bundle-{builder}-{when}"
                row = measure(tree, ["emulate", str(ckpt), "--layout", args.builders_layout, "--out", str(bundle),
                                     "--no-progress", *flags, *([] if fit or tree is not ROOT else ["--no-fit"])],
                              f"emulate --select {builder} {when}", log)
                row["output_bytes"] = dir_bytes(bundle)
                row["peak_over_checkpoint"] = round(row["peak_rss_gb"] * GB / size, 3)
                # the target, the activation cache being small here (a few MB of calibration states)
                target = floor["peak_rss_gb"] + 1.2 * (row["output_bytes"] + shard) / GB
                row["target_gb"] = round(target, 3)
                row["within_target"] = row["rc"] == 0 and row["peak_rss_gb"] <= target
                rows.append(row)
                shutil.rmtree(bundle, ignore_errors=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
        shutil.rmtree(ckpt, ignore_errors=True)
    return rows


def distill_rows(args, work: Path, log: Path, facts: dict) -> list[dict]:
    """One optimizer step of the owner's `distill` with the logit loss: the peak is where the logits are."""
    model, bundle, text = work / "distill-model", work / "distill-bundle", work / "distill.txt"
    size = build_checkpoint(model, 6, 640, 2048, args.distill_vocab, 4, 1, int(GB), seed=2)
    facts["distill_model"] = {"bytes": size, "layers": 6, "hidden": 640, "vocab": args.distill_vocab,
                              "dtype": "bfloat16"}
    text.write_text("the owner distils the emulator on public text only . " * 2_000)
    made = measure(ROOT, ["emulate", str(model), "--layout", "2-1-2", "--select", "uniform", "--no-calib", "--out",
                          str(bundle)], "distill case: emulate 2-1-2 (not compared)", log)
    if made["rc"] != 0:
        raise SystemExit("emulate failed; see log")
    before = before_tree(args.distill_before_ref, work / "distill-before")
    rows = []
    try:
        for when, tree, seq in (("before", before, 512), ("after", ROOT, 512), ("after", ROOT, 2048)):
            rows.append(measure(tree, ["distill", str(model), "--bundle", str(bundle), "--data", str(text), "--out",
                                       str(work / "distilled"), "--steps", "1", "--seq-len", str(seq), "--batch-size",
                                       "4", "--warmup", "0", "--logit-weight", "1", "--no-progress"],
                                f"distill step V={args.distill_vocab} 4x{seq} logit-weight 1 {when}", log))
            shutil.rmtree(work / "distilled", ignore_errors=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    for row in rows:
        row["peak_over_checkpoint"] = round(row["peak_rss_gb"] * GB / size, 3)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results folder (results.json, results.md, log.txt)")
    p.add_argument("--work", default="/tmp/owner_memory", help="scratch folder (deleted at the end)")
    p.add_argument("--before-ref", default="09d098f", help="git commit measured as 'before'")
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-gb", type=float, default=0.6, help="input checkpoint shard size")
    p.add_argument("--layout", default="2-2-2")
    p.add_argument("--skip", default="", help="comma list of cases to skip: owner,builders,eval,distill")
    p.add_argument("--builders", default="importance,iterative,crash,importance+fit",
                   help="emulate --select of the builders case (+fit adds --fit; +fit-r0 also --fit-kl-rank 0; "
                        "none: --no-fit, the selection alone)")
    p.add_argument("--builders-layout", default="2-14-2", help="layout of the builders case")
    p.add_argument("--builders-before-ref", default="a81a0cb",
                   help="the commit measured as 'before' in the builders case (whole model loaded to score)")
    p.add_argument("--calib-tokens", type=int, default=128, help="calibration tokens of the builders case")
    p.add_argument("--builders-after-only", action="store_true",
                   help="re-measure only the 'after' rows of the builders case (the others are kept)")
    p.add_argument("--fit-tokens", type=int, default=512, help="--fit-tokens of the +fit builder")
    p.add_argument("--distill-before-ref", default="5828943",
                   help="the commit measured as 'before' in the distill case (whole logits)")
    p.add_argument("--distill-vocab", type=int, default=250_880, help="vocabulary of the distill case (BLOOM's)")
    args = p.parse_args()
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    work.mkdir(parents=True, exist_ok=True)
    before = before_tree(args.before_ref, work / "before") if "owner" not in args.skip or "eval" not in args.skip \
        else None
    trees = {"before": before, "after": ROOT}
    rows: list[dict] = []
    facts: dict = {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                   "note": "shared machine (2 cores, 24 GiB RAM shared by six engineers); wall times are noisy"}
    try:
        if "owner" not in args.skip:
            ckpt = work / "llama-synthetic"
            t0 = time.time()
            size = build_checkpoint(ckpt, args.layers, args.hidden, args.intermediate, args.vocab, 32, 4,
                                    int(args.shard_gb * GB))
            facts["checkpoint"] = {"bytes": size, "shards": len(list(ckpt.glob("*.safetensors"))),
                                   "largest_shard_bytes": max(p.stat().st_size for p in ckpt.glob("*.safetensors")),
                                   "layers": args.layers, "hidden": args.hidden, "vocab": args.vocab,
                                   "dtype": "bfloat16", "build_s": round(time.time() - t0, 1)}
            print(json.dumps(facts["checkpoint"]), flush=True)
            for when, tree in trees.items():
                bundle = work / f"bundle-{when}"
                # the streamed uniform drop (the default importance selection loads the model to score blocks)
                uniform = ["--select", "uniform", "--no-calib"] if when == "after" else []
                row = measure(tree, ["emulate", str(ckpt), "--layout", args.layout, "--out", str(bundle), *uniform],
                              f"emulate {when}", log)
                row["output_bytes"] = dir_bytes(bundle)
                rows.append(row)
            adapter = work / "adapter"
            text = work / "train.txt"
            text.write_text("the quick brown fox jumps over the lazy dog . " * 200)
            tuned = measure(ROOT, ["tune", str(work / "bundle-after"), "--data", str(text), "--out", str(adapter),
                                   "--mode", "lora", "--steps", "1", "--seq-len", "32", "--batch-size", "1",
                                   "--no-progress"], "tune (to get an adapter; not compared)", log)
            if tuned["rc"] != 0:
                raise SystemExit("tune failed; see log")
            facts["adapter_bytes"] = dir_bytes(adapter)
            for when, tree in trees.items():
                plugged = work / f"plugged-{when}"
                row = measure(tree, ["plugin", str(ckpt), str(adapter), "--out", str(plugged)], f"plugin {when}", log)
                row["output_bytes"] = dir_bytes(plugged)
                rows.append(row)
                shutil.rmtree(plugged, ignore_errors=True)
            for row in rows:
                row["peak_over_checkpoint"] = round(row["peak_rss_gb"] * GB / size, 3)
            shutil.rmtree(ckpt, ignore_errors=True)
        if "builders" not in args.skip:
            rows.extend(builder_rows(args, work, log, facts))
        if "distill" not in args.skip:
            rows.extend(distill_rows(args, work, log, facts))
        if "eval" not in args.skip:
            text = work / "eval.txt"
            words = "offsite tuning keeps the model private and the data private while the adapter moves . "
            text.write_text(words * (60_000 // len(words)))
            for vocab in (262_144, 2_048):
                model = work / f"eval-v{vocab}"
                build_checkpoint(model, 2, 640, 2048, vocab, 4, 1, int(GB), seed=1)
                small = ["--seq-len", "256", "--batch-size", "4", "--max-tokens", "1024"]
                rows.append(measure(ROOT, ["eval", str(model), "--data", str(text), "--seq-len", "2", "--max-tokens",
                                           "2"], f"eval V={vocab} 2 tokens after (floor: load + weights)", log))
                for when, tree in trees.items():
                    row = measure(tree, ["eval", str(model), "--data", str(text), *small],
                                  f"eval V={vocab} 4x256 tokens {when}", log)
                    rows.append(row)
                if vocab > 100_000:  # the token count the old path cannot hold (~19.5 GB at 4 x 2048, per the issue)
                    rows.append(measure(ROOT, ["eval", str(model), "--data", str(text), "--seq-len", "2048",
                                               "--batch-size", "4", "--max-tokens", "4096"],
                                        f"eval V={vocab} 2x2048 tokens after", log))
                shutil.rmtree(model, ignore_errors=True)
    finally:
        previous = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
        measured = {r["label"] for r in rows}  # a partial re-run (--skip) keeps the other cases' rows
        rows = [r for r in previous.get("rows", []) if r["label"] not in measured] + rows
        facts = {**previous.get("facts", {}), **facts}
        (out / "results.json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=2) + "\n")
        lines = ["| case | peak RSS (GB) | x checkpoint | target (GB) | wall (s) | output (GB) | rc |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['label']} | {r['peak_rss_gb']:.2f} | {r.get('peak_over_checkpoint', '')} | "
                         f"{r.get('target_gb', '')} | {r['wall_s']} | {r.get('output_bytes', 0) / GB:.2f} | {r['rc']} |")
        (out / "results.md").write_text("\n".join(lines) + "\n")
        if before is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
