"""Write an EmulatorBundle of SmolLM2-135M for an explicit middle selection (scratch, for issue 12's study).

Uses the library's own make_bundle with its block-map rule replaced by the given one, so the bundle is
exactly what `offsite-ds emulate` writes (same manifest, same weights code) except for which middle
blocks are kept. Sharing (repeated blocks) needs the share_map loader of issue 12 and is not written here.

    python experiments/emulator_study/make_bundle.py OUT_DIR 2,7,10,13,16,19,22,27      # the kept middle blocks of a 2-8-2 layout
"""
from __future__ import annotations

import sys

from offsite_ds import demo_assets, emulator


def main(out_dir: str, kept_csv: str) -> None:
    kept = [int(x) for x in kept_csv.split(",")]
    block_map = [0, 1, *kept, 28, 29]
    emulator.emulator_block_map = lambda n_layers, layout: block_map  # the one rule make_bundle asks
    path = emulator.make_bundle(demo_assets.smollm2_dir(), f"2-{len(kept)}-2", out_dir,
                                select="uniform", calib_data=None).path
    print(path, block_map)


if __name__ == "__main__":
    main(*sys.argv[1:])
