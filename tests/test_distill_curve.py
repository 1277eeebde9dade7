"""benchmarks/distill_curve.py: the distillation-token curve runs end to end, chains its segments and resumes."""
import json

import pytest

from conftest import load_script


def test_curve_chains_segments_scores_every_point_and_resumes(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    from offsite_ds.compare import CompareSettings
    from offsite_ds.errors import OffsiteError

    curve = load_script("benchmarks/distill_curve.py")
    public, held = tmp_path / "public.txt", tmp_path / "held.txt"
    public.write_text("a public corpus the owner may use . " * 80 + "numbers 1 2 3 and words . " * 60)
    held.write_text("words the owner holds out . " * 40)
    valid = tmp_path / "valid.txt"
    valid.write_text(corpus_file.read_text()[:2000])
    s = CompareSettings(layout="2-2-2", steps=2, batch_size=2, seq_len=32, eval_seq_len=32, eval_tokens=256,
                        eval_every=0, calib_tokens=256, distill_lr=1e-3, progress=False)
    loss = {"kd_weight": 0.0, "lm_weight": 1.0, "kd_norm": "global", "logit_weight": 1.0}
    args = (tiny_model_dir("llama"), public, held, corpus_file, {"valid": valid, "test": valid}, tmp_path / "c", s,
            "importance", [64, 128], [0, 128], 2, 16, loss)
    report = curve.run_curve(*args)
    points = report["points"]
    assert [p["tokens"] for p in points] == [0, 64, 128]
    assert [p["distill"] and p["distill"]["steps"] for p in points] == [None, 2, 2]  # 64 tokens = 2 steps of 2x16
    assert all(set(p["emulator"]) == {"public heldout", "valid", "test"} for p in points)
    assert [bool(p.get("round_trip")) for p in points] == [True, False, True]
    second = json.loads((tmp_path / "c" / "t128" / "bundle" / "offsite.json").read_text())
    record = second["compression"]["distillation"]
    assert record["logit_weight"] == 1.0 and record["previous"]["tokens"] == 64  # chained on the 64-token bundle
    md = (tmp_path / "c" / "curve.md").read_text().splitlines()
    assert len(md) == 2 + 3 and all(line.count("|") == md[0].count("|") for line in md)
    assert (tmp_path / "c" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    # resume: every point is cached, nothing is distilled or tuned again
    import offsite_ds.roles.distill as distill_module

    monkeypatch.setattr(distill_module, "distill", lambda *a, **k: pytest.fail("distilled again"))
    assert curve.run_curve(*args)["points"][2]["emulator"] == points[2]["emulator"]
    with pytest.raises(OffsiteError, match="--round-trips"):
        curve.main(["--out", str(tmp_path / "x"), "--points", "64", "--round-trips", "32"])
