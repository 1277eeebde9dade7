"""Block study of SmolLM2-135M for issue 12 (scratch measurement script, not library code).

Calibration text is the OWNER's public corpus (Wikipedia sample in gensim), never Penn Treebank.
Per middle block (layout 2-x-2: blocks 2..27): drop-one perplexity rise and 1 - cos(input, output);
linear CKA between block outputs; then the zero-shot perplexity of emulators chosen by
uniform / importance (drop-one ppl, or 1-cos) / CRaSh-style adjacent clustering, for K = 8 and 9,
without and with sharing (the kept frozen block repeated in the removed positions), on PTB valid and on
the public held-out text (first 8,192 tokens, windows of 512, as the demo).

Emulators are evaluated in memory: the full model's block list is swapped for the executed list
(shared positions hold the same module object); use_cache is off so repeated blocks never share a KV
cache slot. Results are appended to block_study.json as they come (re-running resumes).

    python experiments/emulator_study/block_study.py [OUT.json]   # default ./block_study.json

Measured figures: benchmarks/results/2026-11-23-emulator-study-cpu/.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from offsite_ds import demo_assets
from offsite_ds.data import load_texts, tokenize_corpus
from offsite_ds.runtime import load_model
from offsite_ds.evaluate import token_nll
from offsite_ds.sandwich import Layout, emulator_block_map

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "block_study.json")  # resumed from when it exists
N_LAYERS, BOTTOM, TOP = 30, 2, 2
MIDDLE = list(range(BOTTOM, N_LAYERS - TOP))  # 2..27
# The shared 2-core machine ran at load 6-9 (a full-model pass over 8,192 tokens took 133 s), so the screen
# uses the first 4,096 tokens of each split; drop-one scores use 1,024 calibration tokens, CKA/cos 2,048.
SEQ, EVAL_TOKENS, CALIB_TOKENS, HIDDEN_TOKENS = 512, 4096, 1024, 2048
KS = (8, 9)


def load_state() -> dict:
    return json.loads(OUT.read_text()) if OUT.is_file() else {}


def save_state(state: dict) -> None:
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(OUT)


class Runner:
    def __init__(self):
        torch.set_num_threads(2)
        self.model_dir = demo_assets.smollm2_dir()
        self.model = load_model(self.model_dir).eval()
        self.model.config.use_cache = False
        self.blocks = self.model.model.layers
        tok = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.ids = {
            "ptb_valid": tokenize_corpus(load_texts(demo_assets.penn_treebank_file("valid")), tok)[:EVAL_TOKENS],
            "pub_heldout": tokenize_corpus(load_texts(demo_assets.wikipedia_file("heldout")), tok)[:EVAL_TOKENS],
        }
        calib = tokenize_corpus(load_texts(demo_assets.wikipedia_file("train")), tok)
        self.ids["calib"], self.ids["hidden"] = calib[:CALIB_TOKENS], calib[:HIDDEN_TOKENS]

    def ppl(self, exec_map: list[int], corpus: str) -> float:
        """Perplexity with the model executing the given block sequence (indices into the original 30)."""
        self.model.model.layers = torch.nn.ModuleList(self.blocks[i] for i in exec_map)
        self.model.config.num_hidden_layers = len(exec_map)
        try:
            nll, count = token_nll(self.model, self.ids[corpus], SEQ)
        finally:
            self.model.model.layers = self.blocks
            self.model.config.num_hidden_layers = N_LAYERS
        return math.exp(nll / count)

    @torch.no_grad()
    def hidden_states(self) -> torch.Tensor:
        """[31, tokens, d]: hs[i] is block i's input, hs[i+1] its output (hs[30] is after the final norm)."""
        ids = self.ids["hidden"]
        chunks = []
        for b in range(0, ids.numel() - SEQ + 1, SEQ):
            out = self.model(input_ids=ids[b:b + SEQ][None], output_hidden_states=True)
            chunks.append(torch.stack([h[0, 1:] for h in out.hidden_states]))  # drop each window's 1st token
        return torch.cat(chunks, dim=1)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def importance_select(scores: dict[int, float], k: int) -> list[int]:
    """Top-K middle blocks by score, the middle's first and last always kept."""
    first, last = MIDDLE[0], MIDDLE[-1]
    rest = sorted((b for b in MIDDLE if b not in (first, last)), key=lambda b: -scores[b])[:k - 2]
    return sorted([first, last, *rest])


def crash_clusters(cka: list[list[float]], k: int) -> list[list[int]]:
    """Agglomerative merging of ADJACENT middle blocks (average-linkage CKA of their outputs) into k runs."""
    clusters = [[b] for b in MIDDLE]
    idx = {b: i for i, b in enumerate(MIDDLE)}
    while len(clusters) > k:
        def link(a, b):
            return sum(cka[idx[i]][idx[j]] for i in a for j in b) / (len(a) * len(b))
        best = max(range(len(clusters) - 1), key=lambda i: link(clusters[i], clusters[i + 1]))
        clusters[best:best + 2] = [clusters[best] + clusters[best + 1]]
    return clusters


def exec_map(kept: list[int], shared: bool, clusters: list[list[int]] | None = None) -> list[int]:
    """Executed block sequence: adapters + kept middle; with sharing each removed position runs the kept
    block that stands for it (its cluster's kept block, else the nearest kept block before it)."""
    if not shared:
        middle = kept
    elif clusters is not None:
        middle = [next(b for b in c if b in kept) for c in clusters for _ in c]
    else:
        middle = [max(b for b in kept if b <= pos) for pos in MIDDLE]
    return [*range(BOTTOM), *middle, *range(N_LAYERS - TOP, N_LAYERS)]


def main() -> None:
    state = load_state()
    run = Runner()
    state.setdefault("meta", {"calib_tokens": CALIB_TOKENS, "hidden_tokens": HIDDEN_TOKENS, "eval_tokens": EVAL_TOKENS, "seq": SEQ,
                              "threads": torch.get_num_threads(), "calibration": "wikipedia_file('train')",
                              "eval": {"ptb_valid": "PTB valid", "pub_heldout": "wikipedia_file('heldout')"}})
    timings = state.setdefault("timings", {})

    full = state.setdefault("full", {})
    for corpus in ("ptb_valid", "pub_heldout", "calib"):
        if corpus not in full:
            t = time.perf_counter()
            full[corpus] = run.ppl(list(range(N_LAYERS)), corpus)
            timings[f"full_{corpus}_s"] = time.perf_counter() - t
            print(f"full {corpus}: {full[corpus]:.2f} ({timings[f'full_{corpus}_s']:.0f}s)", flush=True)
            save_state(state)

    if "cos" not in state:
        t = time.perf_counter()
        hs = run.hidden_states()
        cos = {b: float(1 - torch.nn.functional.cosine_similarity(hs[b], hs[b + 1], dim=-1).mean()) for b in MIDDLE}
        outs = [hs[b + 1] for b in MIDDLE]
        cka = [[1.0 if i == j else None for j in range(len(MIDDLE))] for i in range(len(MIDDLE))]
        for i in range(len(MIDDLE)):
            for j in range(i + 1, len(MIDDLE)):
                cka[i][j] = cka[j][i] = linear_cka(outs[i], outs[j])
        state["cos"] = {str(b): v for b, v in cos.items()}
        state["cka"] = cka
        state["cka_adjacent"] = {f"{MIDDLE[i]}-{MIDDLE[i + 1]}": cka[i][i + 1] for i in range(len(MIDDLE) - 1)}
        timings["hidden_cos_cka_s"] = time.perf_counter() - t
        del hs, outs
        save_state(state)
        print("cos + cka done", flush=True)

    drop = state.setdefault("drop_one_calib_ppl", {})
    for b in MIDDLE:
        if str(b) not in drop:
            t = time.perf_counter()
            drop[str(b)] = run.ppl([i for i in range(N_LAYERS) if i != b], "calib")
            timings[f"drop_{b}_s"] = time.perf_counter() - t
            print(f"drop {b}: {drop[str(b)]:.2f} (rise x{drop[str(b)] / full['calib']:.3f})", flush=True)
            save_state(state)

    ppl_score = {b: drop[str(b)] / full["calib"] for b in MIDDLE}
    cos_score = {int(b): v for b, v in state["cos"].items()}
    emus = state.setdefault("emulators", {})
    selections = {}
    for k in KS:
        layout = Layout.parse(f"{BOTTOM}-{k}-{TOP}", N_LAYERS)
        clusters = crash_clusters(state["cka"], k)
        selections[k] = {
            "uniform": (emulator_block_map(N_LAYERS, layout)[BOTTOM:BOTTOM + k], None),
            "importance_ppl": (importance_select(ppl_score, k), None),
            "crash": ([c[0] for c in clusters], clusters),
            "importance_cos": (importance_select(cos_score, k), None),
        }
    # cheapest and most informative first: every unshared selection, then the shared (full-depth) ones
    # Under the load of the day, the shared (full-depth, 30-block) variants were measured for K=8 only.
    for shared in (False, True):
        for k in KS if not shared else KS[:1]:
            for name, (kept, cl) in selections[k].items():
                key = f"2-{k}-2 {name}{' shared' if shared else ''}"
                rec = emus.setdefault(key, {"kept": kept, "exec_map": exec_map(kept, shared, cl),
                                            "clusters": cl})
                twin = next((r for r in emus.values() if r is not rec and r["exec_map"] == rec["exec_map"]
                             and "pub_heldout" in r), None)
                if twin is not None:  # the same executed blocks as a selection already measured
                    rec.update({c: twin[c] for c in ("ptb_valid", "pub_heldout", "ptb_valid_ratio",
                                                       "pub_heldout_ratio")})
                for corpus in ("ptb_valid", "pub_heldout"):
                    if corpus not in rec:
                        t = time.perf_counter()
                        rec[corpus] = run.ppl(rec["exec_map"], corpus)
                        rec[f"{corpus}_ratio"] = rec[corpus] / full[corpus]
                        timings[f"{key} {corpus}_s"] = time.perf_counter() - t
                        save_state(state)
                print(f"{key:32s} kept={kept} ptb_valid={rec['ptb_valid']:.1f} (x{rec['ptb_valid_ratio']:.1f}) "
                      f"pub={rec['pub_heldout']:.1f} (x{rec['pub_heldout_ratio']:.1f})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
