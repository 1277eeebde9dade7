"""The GPU compile gate on every CPU run: every Triton kernel, in each constexpr branch and dtype the CUDA
launch path chooses, compiles for sm_90 (and its bf16 set for sm_80) with ptxas; tl.dot kernels use the
tensor cores in half types. The jobs come from running the real launch code with launches intercepted
(kernels/compile_gate.py), split into chunks so that a distributed run can spread them.

Each chunk compiles in a worker process started without TRITON_INTERPRET and with a fresh Triton cache.
The per-kernel report (compile seconds, max registers, spilling jobs) is printed (`pytest -s` shows it).
"""
import pytest

from offsite_ds.kernels.compile_gate import ARCHS, failures, list_jobs, report, run_gate

CHUNKS = 3


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_every_kernel_compiles_for_sm90_and_sm80(chunk):
    results = run_gate("ci", ARCHS, jobs_n=1, index=chunk, count=CHUNKS)
    print(report(results))
    assert results, "the gate compiled nothing"
    assert all("error" in r or r["regs"] > 0 for r in results), "cuobjdump found no register count"
    bad = failures(results)
    assert not bad, "\n".join(bad[:20])


def test_the_jobs_cover_every_kernel_arch_dtype_and_autotune_config():
    from offsite_ds.kernels.lora_linear import H100_CONFIGS

    listing = list_jobs("ci")
    jobs = listing["jobs"]
    for kernel in listing["kernels"]:
        mine = [j for j in jobs if j["kernel"] == kernel]
        assert {j["arch"] for j in mine} == set(ARCHS), kernel
        sm90 = {j["dtypes"] for j in mine if j["arch"] == 90}
        # fp32 LoRA takes cuBLAS by design; every other kernel runs in each dtype
        for dtype in ("bf16", "fp16") if kernel == "_matmul_lowrank_kernel" else ("fp32", "bf16", "fp16"):
            assert any(dtype in d.split("/") for d in sm90), (kernel, dtype, sm90)
    branches = {(j["kernel"], tuple(sorted(j["branch"].items()))) for j in jobs}
    assert (("_cross_entropy_rows_kernel", (("HAS_LSE", True), ("WRITE_GRAD", True)))) in branches  # vocab-chunked
    assert {b[1] for b in branches if b[0] == "_bias_activation_forward_kernel"} >= {
        (("ACT", a), ("HAS_BIAS", h)) for a in (0, 1, 2) for h in (False, True)}
    lora = list_jobs("all", (90,), kernel="_matmul_lowrank_kernel")["jobs"]
    tuned = {(j["tiles"]["BLOCK_M"], j["tiles"]["BLOCK_N"], j["tiles"]["BLOCK_K"], j["num_stages"], j["num_warps"])
             for j in lora}
    assert tuned == {(m["BLOCK_M"], m["BLOCK_N"], m["BLOCK_K"], stages, warps) for m, stages, warps in H100_CONFIGS}
    assert {j["tiles"]["BLOCK_R"] for j in lora} == {16, 32, 64}
