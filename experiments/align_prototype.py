"""The prototype behind `emulate --fit-align` (SmolLM2-135M, PTB; its own small loops, not the toolkit's round trip).

The owner tunes the adapter blocks (WHICH=adapter) or the adapter and the kept middle (WHICH=all) through the
importance 2-8-2 emulator with KL(full || emulator) on public Wikipedia text; the data owner tunes the adapter
blocks (full mode, 100 steps of 4 x 256 PTB train tokens, lr 3e-4, best on emulator PTB valid); the owner plugs
in the tuned blocks as they are ("naive") or the model's own blocks plus the data owner's change ("delta").

    python experiments/align_prototype.py TOKENS EPOCHS LR WHICH   # e.g. 32768 3 1e-4 adapter; 0 0 1e-4 none
"""
import copy, math, sys, time
import torch
from transformers import AutoTokenizer
from offsite_ds import calibrate, demo_assets
from offsite_ds.data import load_texts, tokenize_corpus
from offsite_ds.evaluate import logit_kl
from offsite_ds.runtime import load_model
from offsite_ds.surgery import running_blocks

comp_steps_tokens, comp_epochs, comp_lr, which = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
md = demo_assets.smollm2_dir()
tok = AutoTokenizer.from_pretrained(md, local_files_only=True)
model = load_model(md).eval()
wiki = tokenize_corpus(load_texts(demo_assets.wikipedia_file("train")), tok)[1024:]
ptb_train = tokenize_corpus(load_texts(demo_assets.penn_treebank_file("train")), tok)
ptb_valid = tokenize_corpus(load_texts(demo_assets.penn_treebank_file("valid")), tok)[:8192]
bm = [0, 1, 2, 6, 8, 11, 22, 23, 24, 27, 28, 29]
ad = [0, 1, 28, 29]
layers = model.model.layers
A0 = {i: copy.deepcopy(layers[i].state_dict()) for i in bm}

def ppl(emu):
    if emu:
        with running_blocks(model, bm):
            return math.exp(calibrate.mean_nll(model, ptb_valid, 512))
    return math.exp(calibrate.mean_nll(model, ptb_valid, 512))

def cosine(step, steps, warm=0):
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

def train(params, loss_of, batches, steps, lr, warm, clip=1.0, evalf=None, every=0):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, steps, warm))
    best = (float("inf"), None)
    order = []
    g = torch.Generator().manual_seed(0)
    for s in range(steps):
        if not order:
            order = torch.randperm(len(batches), generator=g).tolist()
        loss = loss_of(batches[order.pop()])
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip); opt.step(); sched.step()
        if (s + 1) % max(1, steps // 10) == 0:
            print(f"  step {s+1} loss {loss.item():.4f}", flush=True)
        if every and ((s + 1) % every == 0 or s + 1 == steps):
            model.eval(); v = evalf(); model.train()
            print(f"  eval step {s+1}: emu valid ppl {v:.2f}", flush=True)
            if v < best[0]:
                best = (v, {i: copy.deepcopy(layers[i].state_dict()) for i in ad})
    return best

print("full", round(ppl(False), 2), "emulator", round(ppl(True), 2), flush=True)
t = time.time()
# --- owner: compensation
if which != "none":
    n = comp_steps_tokens // 512
    windows = wiki[: n * 512].view(n, 512)
    batches = [windows[k:k + 4] for k in range(0, n, 4)]
    train_ids = ad if which == "adapter" else bm
    params = [p for i in train_ids for p in layers[i].parameters()]
    for p in model.parameters(): p.requires_grad_(False)
    for p in params: p.requires_grad_(True)
    def kl(x):
        with torch.no_grad():
            teacher = model(x).logits[:, 1:].float()
        with running_blocks(model, bm):
            student = model(x).logits[:, 1:].float()
        return logit_kl(student, teacher)
    model.train()
    steps = comp_epochs * len(batches)
    train(params, kl, batches, steps, comp_lr, 0)
    model.eval()
    print(f"compensated ({which}) in {time.time()-t:.0f}s: emulator", round(ppl(True), 2), flush=True)
Ac = {i: copy.deepcopy(layers[i].state_dict()) for i in bm}
# --- data owner: full-mode tuning of the adapter blocks through the emulator
n = len(ptb_train) // 256
windows = ptb_train[: n * 256].view(n, 256)
perm = torch.randperm(n, generator=torch.Generator().manual_seed(42))[:400]
batches = [windows[perm[k:k + 4]] for k in range(0, 400, 4)]
for p in model.parameters(): p.requires_grad_(False)
params = [p for i in ad for p in layers[i].parameters()]
for p in params: p.requires_grad_(True)
def lm(x):
    with running_blocks(model, bm):
        return model(x, labels=x).loss
model.train()
t = time.time()
best_v, At = train(params, lm, batches, 100, 3e-4, 6, evalf=lambda: ppl(True), every=20)
model.eval()
print(f"tuned in {time.time()-t:.0f}s; OT emulator valid {best_v:.2f}", flush=True)
for p in model.parameters(): p.requires_grad_(False)
# --- owner: plug-in
with torch.no_grad():
    for i in bm:  # the full model's own middle blocks back
        layers[i].load_state_dict(A0[i])
    for i in ad:
        layers[i].load_state_dict(At[i])
    naive = ppl(False)
    for i in ad:
        layers[i].load_state_dict({k: A0[i][k] + (At[i][k] - Ac[i][k]) for k in A0[i]})
    delta = ppl(False)
print(f"RESULT which={which} comp={comp_steps_tokens}x{comp_epochs}@{comp_lr}: OT emulator {best_v:.2f} "
      f"plug-in naive {naive:.2f} delta {delta:.2f}", flush=True)
