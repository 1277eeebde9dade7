"""Block streaming (offsite_ds.block_stream): every variant the calibrated builders score, run block by block
from a loaded model or from the checkpoint's shards, gives the numbers of running the model itself; the sweep
reads each block once and shares the trunk; `emulate` never loads the whole model."""
import pytest
import torch

from conftest import FAMILIES


@pytest.fixture(scope="module")
def public_ids():
    from offsite_ds.data import tokenize_corpus
    from offsite_ds.tiny import byte_tokenizer

    text = "a public corpus the owner may use . " * 30 + "numbers 1 2 3 and words . " * 20
    return tokenize_corpus([text], byte_tokenizer())[:300]


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    """Gemma-2 at toy size: alternating sliding-window and full attention, final logit soft-capping."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from offsite_ds.tiny import byte_tokenizer

    config = AutoConfig.for_model("gemma2", vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                                  sliding_window=16, pad_token_id=257, bos_token_id=256, eos_token_id=256,
                                  final_logit_softcapping=30.0, query_pre_attn_scalar=8)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_gemma2")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


VARIANTS = ([0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 4, 5, 6, 7], [0, 1, 3, 3, 3, 6, 7], [0, 7])


@pytest.mark.parametrize("family", FAMILIES + ("gemma2",))
def test_streamed_and_loaded_variants_equal_running_the_model(family, tiny_model_dir, gemma2_dir, public_ids):
    import copy

    from offsite_ds.block_stream import LoadedBlocks, Path, StreamedBlocks, open_stream, path_nlls
    from offsite_ds.calibrate import mean_nll
    from offsite_ds.families import blocks_of
    from offsite_ds.runtime import load_model
    from offsite_ds.surgery import running_blocks

    model_dir = gemma2_dir if family == "gemma2" else tiny_model_dir(family)
    model = load_model(model_dir)
    changed = copy.deepcopy(blocks_of(model)[4])  # a replacement module, as a fitted block is
    with torch.no_grad():
        for p in changed.parameters():
            p.mul_(1.5)
    expected = []
    for blocks in VARIANTS:
        with running_blocks(model, blocks):
            expected.append(mean_nll(model, public_ids, 64))
    with running_blocks(model, VARIANTS[1], {4: changed}):
        expected.append(mean_nll(model, public_ids, 64))
    paths = [Path(tuple(v)) for v in VARIANTS] + [Path(tuple(VARIANTS[1]), {4: changed})]
    for source in (LoadedBlocks(model), StreamedBlocks(model_dir)):
        got = path_nlls(source, open_stream(source, public_ids, 64), paths)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), type(source).__name__
    assert len(blocks_of(model)) == 8 and model.config.num_hidden_layers == 8  # restored
    assert len(set(expected)) == len(expected)  # the variants really differ


def test_a_streamed_source_holds_no_block_until_asked(tiny_model_dir):
    from offsite_ds.block_stream import StreamedBlocks
    from offsite_ds.families import blocks_of
    from offsite_ds.runtime import load_model

    model_dir = tiny_model_dir("llama")
    source = StreamedBlocks(model_dir)
    assert all(p.is_meta for p in blocks_of(source.model).parameters())
    rest = [p for n, p in source.model.named_parameters() if ".layers." not in n]
    assert rest and not any(p.is_meta for p in rest)
    reference = load_model(model_dir)
    block = source.block(5)
    for (name, got), (_, want) in zip(block.state_dict().items(), blocks_of(reference)[5].state_dict().items()):
        assert torch.equal(got, want), name
    assert source.model.lm_head.weight is source.model.model.embed_tokens.weight  # the tie survives


def test_the_sweep_reads_each_block_once_and_forks_off_the_trunk(tiny_model_dir, public_ids):
    from offsite_ds.block_stream import LoadedBlocks, Path, open_stream, sweep

    class Counting(LoadedBlocks):
        fetched: list[int] = []

        def block(self, index):
            self.fetched.append(index)
            return super().block(index)

    from offsite_ds.runtime import load_model

    source = Counting(load_model(tiny_model_dir("opt")))
    stream = open_stream(source, public_ids, 64)
    runs = []
    handles = [source.block(i).register_forward_hook(lambda *_a, i=i: runs.append(i)) for i in range(8)]
    source.fetched.clear()
    middle = [2, 3, 4, 5]
    paths = [Path(tuple(range(8)))] + [Path(tuple(p for p in range(8) if p != i)) for i in middle]
    sweep(source, stream, paths)
    for h in handles:
        h.remove()
    assert source.fetched == list(range(8))
    batches = len(stream.inputs)
    # the trunk runs every block once; the variant without block i runs only the blocks after i
    assert len(runs) == batches * (8 + sum(7 - i for i in middle))


def test_a_path_that_goes_back_is_refused_in_one_line():
    from offsite_ds.block_stream import Path
    from offsite_ds.errors import OffsiteError

    with pytest.raises(OffsiteError, match="non-decreasing"):
        Path((0, 3, 2, 7))


def test_fitting_from_the_shards_equals_fitting_the_loaded_model(tiny_model_dir, public_ids):
    from offsite_ds.block_stream import StreamedBlocks
    from offsite_ds.fitting import FitSettings, fit_kept_blocks
    from offsite_ds.runtime import load_model

    model_dir = tiny_model_dir("llama")
    settings = FitSettings(tokens=256, epochs=2, lr=1e-3, seq_len=64, batch_size=2)
    block_map = [0, 1, 2, 5, 7]
    loaded, report, _ = fit_kept_blocks(load_model(model_dir), public_ids, block_map, 2, 2, settings)
    streamed, report_streamed, _ = fit_kept_blocks(StreamedBlocks(model_dir), public_ids, block_map, 2, 2, settings)
    assert [(r["block"], r["end"]) for r in report] == [(r["block"], r["end"]) for r in report_streamed]
    for r, q in zip(report, report_streamed):
        assert (r["before"], r["after"]) == pytest.approx((q["before"], q["after"]), rel=1e-5)
    assert set(loaded) == set(streamed) == {2, 5}
    for i in loaded:
        for a, b in zip(loaded[i].parameters(), streamed[i].parameters()):
            assert torch.allclose(a, b, atol=1e-6)
    assert report[0]["after"] < report[0]["before"]


@pytest.mark.parametrize("select", ["importance", "iterative", "crash"])
def test_emulate_scores_and_guards_without_loading_the_model(select, tiny_model_dir, corpus_file, tmp_path,
                                                             monkeypatch):
    import offsite_ds.runtime
    from offsite_ds.emulator import make_bundle
    from offsite_ds.validation import read_manifest
    from offsite_ds.manifests import BUNDLE_FORMAT

    def refuse(*_a, **_k):
        raise AssertionError("emulate loaded the whole model")

    monkeypatch.setattr(offsite_ds.runtime, "load_model", refuse)
    out = make_bundle(tiny_model_dir("llama"), "1-3-1", tmp_path / "bundle", select=select, calib_data=corpus_file,
                      calib_tokens=256, allow_far=True).path
    manifest = read_manifest(out, BUNDLE_FORMAT)
    assert manifest.quality.ratio > 0 and len(manifest.block_map) == 5


def test_fitted_blocks_wait_in_the_bundles_dtype_and_are_measured_as_shipped(tiny_model_dir, public_ids):
    from offsite_ds.block_stream import LoadedBlocks, Path, Upcast, open_stream, path_nlls
    from offsite_ds.fitting import FitSettings, fit_kept_blocks
    from offsite_ds.runtime import load_model

    model = load_model(tiny_model_dir("llama"))
    settings = FitSettings(tokens=256, epochs=1, lr=1e-3, seq_len=64, batch_size=2)
    fitted, _, _ = fit_kept_blocks(model, public_ids, [0, 1, 2, 5, 7], 2, 2, settings, store_dtype=torch.bfloat16)
    params = [p for b in fitted.values() for p in b.parameters()]
    assert all(p.dtype == torch.bfloat16 and p.grad is None and not p.requires_grad for p in params)
    source = LoadedBlocks(model)
    stream = open_stream(source, public_ids, 64)
    import copy

    shipped = {i: copy.deepcopy(b).float() for i, b in fitted.items()}  # what a bf16 bundle loads back, in fp32
    upcast, exact = path_nlls(source, stream, [Path((0, 1, 2, 5, 7), {i: Upcast(b, torch.float32)
                                                                    for i, b in fitted.items()}),
                                               Path((0, 1, 2, 5, 7), shipped)])
    assert upcast == pytest.approx(exact, rel=1e-6)
    assert all(p.dtype == torch.bfloat16 for b in fitted.values() for p in b.parameters())  # never upcast in place
