"""Calibration on the owner's PUBLIC text: block representations, linear CKA, block importance, quality.

What the calibrated emulator builders (offsite_ds.sandwich: importance-aware, CRaSh) and the emulate
guard measure. Everything runs the owner's full model as it is: a dropped or repeated block is a
temporarily swapped block list (`running_blocks`), never a copy of the weights. Representations are
kept only at a seeded sample of token positions, so memory is blocks x sample x hidden, not x tokens.
The data owner's corpus never enters here: the caller passes the owner's public calibration file.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from offsite_ds.data import corpus_fingerprint, load_texts, max_positions, tokenize_corpus
from offsite_ds.errors import DataError
from offsite_ds.evaluate import token_nll
from offsite_ds.families import family_of, get_path
from offsite_ds.surgery import block_input, block_output, running_blocks

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


def calibration_seq_len(model: nn.Module, seq_len: int = DEFAULT_SEQ_LEN) -> int:
    limit = max_positions(model.config)
    return min(seq_len, limit) if limit else seq_len


def mean_nll(model: nn.Module, ids: torch.Tensor, seq_len: int, batch_size: int = 4) -> float:
    nll, count = token_nll(model, ids, seq_len, seq_len, batch_size)
    return nll / count


@torch.no_grad()
def block_outputs(model: nn.Module, ids: torch.Tensor, seq_len: int, sample_tokens: int = DEFAULT_SAMPLE_TOKENS,
                  seed: int = 0, batch_size: int = 4) -> torch.Tensor:
    """[depth + 1, n, hidden] float32: the first block's input, then every block's output, at n sampled tokens.

    Positions are sampled once (seeded) over the whole stream, so every block is seen on the same tokens.
    Each window's first token is never sampled: it is the attention sink, whose hidden states are orders of
    magnitude larger than the others' and would dominate CKA and cosine (measured on SmolLM2-135M).
    """
    blocks = get_path(model, family_of(model).blocks)
    windows = [(b, min(b + seq_len, ids.numel())) for b in range(0, ids.numel() - 1, seq_len)]
    windows = [w for w in windows if w[1] - w[0] >= 2]
    total = sum(e - b - 1 for b, e in windows)  # candidates: every position but each window's first
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(total, generator=g)[:sample_tokens].sort().values
    captured: list[list[torch.Tensor]] = [[] for _ in range(len(blocks) + 1)]
    picks: list[torch.Tensor] = []  # per batch: flat indices into [batch * length] of the sampled tokens

    def keep(slot: int, hidden: torch.Tensor) -> None:
        captured[slot].append(hidden.reshape(-1, hidden.size(-1))[picks[-1]].float().cpu())

    def take_input(_m, args, kwargs):
        keep(0, block_input(args, kwargs))

    handles = [blocks[0].register_forward_pre_hook(take_input, with_kwargs=True)]
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_hook(lambda _m, _a, out, slot=i + 1: keep(slot, block_output(out))))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        offset = 0
        by_len: dict[int, list[tuple[int, int, int]]] = {}
        for b, e in windows:
            by_len.setdefault(e - b, []).append((b, e, offset))
            offset += e - b - 1
        for length, group in by_len.items():
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                flat = []
                for row, (_, _, off) in enumerate(chunk):
                    mine = chosen[(chosen >= off) & (chosen < off + length - 1)] - off + 1
                    flat.append(mine + row * length)
                picks.append(torch.cat(flat))
                if picks[-1].numel() == 0:
                    continue
                inputs = torch.stack([ids[b:e] for b, e, _ in chunk]).to(device)
                model(input_ids=inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return torch.stack([torch.cat(c) for c in captured])


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
def drop_importance(model: nn.Module, ids: torch.Tensor, middle: list[int], seq_len: int,
                    progress: bool = False) -> list[float]:
    """Perplexity ratio (without the block / full model) of each middle block dropped alone."""
    from tqdm.auto import tqdm

    depth = len(get_path(model, family_of(model).blocks))
    base = mean_nll(model, ids, seq_len)
    scores = []
    for i in tqdm(middle, desc="importance (drop one block)", disable=not progress):
        with running_blocks(model, [p for p in range(depth) if p != i]):
            scores.append(math.exp(mean_nll(model, ids, seq_len) - base))
    return scores


def importance_scores(model: nn.Module, ids: torch.Tensor, middle: list[int], seq_len: int, metric: str = "drop",
                      sample_tokens: int = DEFAULT_SAMPLE_TOKENS, progress: bool = False) -> list[float]:
    """How much each middle block matters on the calibration text (higher = keep it)."""
    if metric == "drop":
        return drop_importance(model, ids, middle, seq_len, progress)
    if metric == "cosine":
        return cosine_importance(block_outputs(model, ids, seq_len, sample_tokens), middle)
    raise DataError(f"unknown importance metric '{metric}'; choose one of {', '.join(IMPORTANCE_METRICS)}")


def middle_similarity(model: nn.Module, ids: torch.Tensor, middle: list[int], seq_len: int,
                      sample_tokens: int = DEFAULT_SAMPLE_TOKENS) -> list[list[float]]:
    """Linear CKA between the middle blocks' outputs (the CRaSh builder clusters on it)."""
    reps = block_outputs(model, ids, seq_len, sample_tokens)
    return cka_matrix(reps[[i + 1 for i in middle]])


@torch.no_grad()
def quality(full: nn.Module, emulator_positions: list[int], ids: torch.Tensor, seq_len: int, fingerprint: str,
            replace: dict[int, nn.Module] | None = None) -> dict:
    """Zero-shot perplexity of the emulator and of the full model on the same calibration tokens.

    The emulator is the full model run with the original blocks `emulator_positions` (a shared emulator
    repeats some; `replace` holds compressed copies of kept blocks), so the model is never copied.
    """
    full_nll = mean_nll(full, ids, seq_len)
    with running_blocks(full, emulator_positions, replace):
        emulator_nll = mean_nll(full, ids, seq_len)
    return {"emulator_ppl": math.exp(emulator_nll), "full_ppl": math.exp(full_nll),
            "ratio": math.exp(emulator_nll - full_nll), "tokens": int(ids.numel()), "corpus_fingerprint": fingerprint}
