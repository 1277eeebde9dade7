"""Calibration on the owner's PUBLIC text: block representations, linear CKA, block importance, quality.

What the calibrated emulator builders (offsite_ds.sandwich: importance-aware, CRaSh) and the emulate
guard measure. Every variant of the owner's model (without block i, the emulator) is a path run by
offsite_ds.block_stream over a BlockSource: a model in memory, or the checkpoint streamed block by block, so
scoring a 7B model never holds it whole; the numbers are the same either way. Representations are kept only
at a seeded sample of token positions, so memory is blocks x sample x hidden, not x tokens.
The data owner's corpus never enters here: the caller passes the owner's public calibration file.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from offsite_ds.data import corpus_fingerprint, load_texts, tokenize_corpus, window_len
from offsite_ds.errors import DataError
from offsite_ds.evaluate import token_nll
from offsite_ds.block_stream import BlockSource, as_source, full_path, open_stream, path_nlls, sweep
from offsite_ds.block_stream import Path as BlockPath

# importance (drop) runs the model once per middle block on these; 1,024 tokens of the public Wikipedia sample
# found SmolLM2-135M's critical blocks (11, 2, 24, 8: helper e2's study, benchmarks/results/2026-11-23-emulator-study-cpu)
DEFAULT_CALIB_TOKENS = 1024
DEFAULT_SAMPLE_TOKENS = 2048
DEFAULT_SEQ_LEN = 512
IMPORTANCE_METRICS = ("drop", "cosine")


def calibration_ids(path: str | Path, tokenizer, max_tokens: int = DEFAULT_CALIB_TOKENS,
                    text_field: str = "text") -> tuple[torch.Tensor, dict]:
    """The first `max_tokens` tokens of the owner's calibration corpus, and its record for the manifest."""
    if max_tokens < 2:
        raise DataError(f"--calib-tokens {max_tokens} must be at least 2")
    texts = load_texts(path, text_field)
    pieces, have = [], 0
    for start in range(0, len(texts), 64):  # tokenise only as much of a large corpus as is used
        pieces.append(tokenize_corpus(texts[start:start + 64], tokenizer))
        have += pieces[-1].numel()
        if have >= max_tokens:
            break
    ids = torch.cat(pieces)[:max_tokens]
    if ids.numel() < 2:
        raise DataError(f"{path}: the calibration text has {ids.numel()} tokens; give more text")
    return ids, {"corpus_fingerprint": corpus_fingerprint(texts), "tokens": int(ids.numel())}


def calibration_seq_len(model: nn.Module | BlockSource, seq_len: int = DEFAULT_SEQ_LEN) -> int:
    return window_len(seq_len, as_source(model).model.config)


def mean_nll(model: nn.Module, ids: torch.Tensor, seq_len: int, batch_size: int = 4) -> float:
    nll, count = token_nll(model, ids, seq_len, seq_len, batch_size)
    return nll / count


@torch.no_grad()
def block_outputs(model: nn.Module | BlockSource, ids: torch.Tensor, seq_len: int,
                  sample_tokens: int = DEFAULT_SAMPLE_TOKENS, seed: int = 0, batch_size: int = 4) -> torch.Tensor:
    """[depth + 1, n, hidden] float32: the first block's input, then every block's output, at n sampled tokens.

    Positions are sampled once (seeded) over the whole stream, so every block is seen on the same tokens.
    Each window's first token is never sampled: it is the attention sink, whose hidden states are orders of
    magnitude larger than the others' and would dominate CKA and cosine (measured on SmolLM2-135M).
    """
    source = as_source(model)
    stream = open_stream(source, ids, seq_len, batch_size)
    windows = sorted(w for chunk in stream.chunks for w in chunk)
    offsets, total = {}, 0
    for b, e, _ in windows:  # candidates: every position but each window's first
        offsets[b], total = total, total + e - b - 1
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(total, generator=g)[:sample_tokens].sort().values
    picks = []  # per batch: flat indices into [batch * length] of the sampled tokens
    for chunk in stream.chunks:
        length = chunk[0][1] - chunk[0][0]
        flat = [chosen[(chosen >= offsets[b]) & (chosen < offsets[b] + length - 1)] - offsets[b] + 1 + row * length
                for row, (b, _, _) in enumerate(chunk)]
        picks.append(torch.cat(flat))
    captured: list[torch.Tensor] = []

    def keep(_block: int, _paths: list[int], states: list[torch.Tensor]) -> None:
        captured.append(torch.cat([h.reshape(-1, h.size(-1))[pick.to(h.device)].float().cpu()
                                   for h, pick in zip(states, picks)]))

    sweep(source, stream, [full_path(source)], visit=keep)
    return torch.stack(captured)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of two [n, d] representations of the same n tokens.

    1 for identical representations; invariant to orthogonal transforms and isotropic scaling.
    """
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    denom = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if denom <= 0:
        return 0.0
    return float(torch.linalg.matrix_norm(y.T @ x) ** 2 / denom)


def cka_matrix(reps: torch.Tensor) -> list[list[float]]:
    """Pairwise linear CKA of a stack of representations [m, n, d] (computed once per pair)."""
    centred = [r.double() - r.double().mean(0) for r in reps]
    norms = [float(torch.linalg.matrix_norm(c.T @ c)) for c in centred]
    m = len(centred)
    out = [[1.0] * m for _ in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            denom = norms[i] * norms[j]
            value = float(torch.linalg.matrix_norm(centred[j].T @ centred[i]) ** 2 / denom) if denom > 0 else 0.0
            out[i][j] = out[j][i] = value
    return out


def adjacent_cka(reps: torch.Tensor) -> list[float]:
    """CKA between each block's output and the next block's output."""
    return [linear_cka(reps[i], reps[i + 1]) for i in range(len(reps) - 1)]


def cosine_importance(reps: torch.Tensor, middle: list[int]) -> list[float]:
    """1 - mean cos(input, output) of each middle block: how much it turns the residual stream (cheap)."""
    scores = []
    for i in middle:
        cos = torch.nn.functional.cosine_similarity(reps[i].double(), reps[i + 1].double(), dim=-1)
        scores.append(float(1.0 - cos.mean()))
    return scores


@torch.no_grad()
def drop_importance(model: nn.Module | BlockSource, ids: torch.Tensor, middle: list[int], seq_len: int,
                    progress: bool = False) -> list[float]:
    """Perplexity ratio (without the block / full model) of each middle block dropped alone.

    One sweep: the variants share the full model's states up to the block they drop (about 1 + m/2 passes).
    """
    source = as_source(model)
    full = full_path(source)
    paths = [full] + [BlockPath(tuple(p for p in full.blocks if p != i)) for i in middle]
    nlls = path_nlls(source, open_stream(source, ids, seq_len), paths,
                     desc="importance (drop one block)" if progress else None)
    return [math.exp(n - nlls[0]) for n in nlls[1:]]


def importance_scores(model: nn.Module | BlockSource, ids: torch.Tensor, middle: list[int], seq_len: int,
                      metric: str = "drop", sample_tokens: int = DEFAULT_SAMPLE_TOKENS,
                      progress: bool = False) -> list[float]:
    """How much each middle block matters on the calibration text (higher = keep it)."""
    if metric == "drop":
        return drop_importance(model, ids, middle, seq_len, progress)
    if metric == "cosine":
        return cosine_importance(block_outputs(model, ids, seq_len, sample_tokens), middle)
    raise DataError(f"unknown importance metric '{metric}'; choose one of {', '.join(IMPORTANCE_METRICS)}")


def middle_similarity(model: nn.Module | BlockSource, ids: torch.Tensor, middle: list[int], seq_len: int,
                      sample_tokens: int = DEFAULT_SAMPLE_TOKENS) -> list[list[float]]:
    """Linear CKA between the middle blocks' outputs (the CRaSh builder clusters on it)."""
    reps = block_outputs(model, ids, seq_len, sample_tokens)
    return cka_matrix(reps[[i + 1 for i in middle]])


@torch.no_grad()
def quality(full: nn.Module | BlockSource, emulator_positions: list[int], ids: torch.Tensor, seq_len: int,
            fingerprint: str, replace: dict[int, nn.Module] | None = None) -> dict:
    """Zero-shot perplexity of the emulator and of the full model on the same calibration tokens.

    The emulator is the full model run with the original blocks `emulator_positions` (a shared emulator
    repeats some; `replace` holds compressed or fitted copies of kept blocks), so the model is never copied.
    """
    source = as_source(full)
    full_nll, emulator_nll = path_nlls(source, open_stream(source, ids, seq_len),
                                       [full_path(source), BlockPath(tuple(emulator_positions), replace or {})])
    return {"emulator_ppl": math.exp(emulator_nll), "full_ppl": math.exp(full_nll),
            "ratio": math.exp(emulator_nll - full_nll), "tokens": int(ids.numel()), "corpus_fingerprint": fingerprint}
