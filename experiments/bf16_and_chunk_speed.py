"""Two CPU timings behind two defaults (2026-12-05, 2-core AMD EPYC with AVX512-BF16):

1. `--fit-precision auto` (runtime.native_bf16): SmolLM2's head product (2,048 x 576 x 49,152) in fp32 and bf16, and a
   SmolLM2-135M training step of the data owner's 2+2 adapter blocks (4 x 512 tokens) in fp32 and under bf16 autocast.
2. `evaluate.MIN_CHUNK_ROWS`: head_kl's loss and gradient at BLOOM's vocabulary (250,880; hidden 640, 1,024 rows) with
   chunks of 16 MB to 1 GB of fp32 logits, against whole logits.

    python experiments/bf16_and_chunk_speed.py [steps|chunks]...   # default: both
"""
import sys
import time

import torch

from offsite_ds import demo_assets
from offsite_ds.evaluate import head_kl, logit_kl
from offsite_ds.runtime import load_model


def seconds(fn, repeat: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def steps() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        a, w = torch.randn(2048, 576, dtype=dtype), torch.randn(49152, 576, dtype=dtype)
        print(f"head product {dtype}: {seconds(lambda: a @ w.T) * 1e3:.0f} ms", flush=True)
    model = load_model(demo_assets.smollm2_dir()).train()
    for name, p in model.named_parameters():
        p.requires_grad_(any(f"layers.{i}." in name for i in (0, 1, 28, 29)))
    ids = torch.randint(0, 49152, (4, 512))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    for bf16 in (False, True, False, True):
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        print(f"adapter step {'bf16 autocast' if bf16 else 'fp32'}: {seconds(step):.2f} s", flush=True)


def chunks() -> None:
    head = torch.nn.Linear(640, 250_880, bias=False).requires_grad_(False)
    student, teacher = torch.randn(1024, 640, requires_grad=True), torch.randn(1024, 640)
    for chunk_bytes in (16 << 20, 64 << 20, 256 << 20, 1 << 30):
        rows = chunk_bytes // (4 * 250_880)
        t = seconds(lambda: head_kl(student, teacher, head, chunk_bytes=chunk_bytes).backward(), 1)
        print(f"head_kl, {rows}-row chunks: {t:.2f} s", flush=True)
    print(f"whole logits: {seconds(lambda: logit_kl(head(student), head(teacher)).backward(), 1):.2f} s", flush=True)


if __name__ == "__main__":
    for what in sys.argv[1:] or ["steps", "chunks"]:
        {"steps": steps, "chunks": chunks}[what]()
