"""Where the toolkit's non-package folders live, in a checkout and in an installed wheel.

The repository keeps the card's top-level `kernels/` (Triton sources) and `ds_configs/` (stock DeepSpeed
configs). Neither may be importable or looked up as a top-level name once installed: a top-level `kernels`
package would shadow Hugging Face's `kernels`, which transformers imports. So a wheel carries both inside
the package (`offsite_ds/kernels/`, `offsite_ds/ds_configs/`, copied by setup.py's build step), while a
checkout (editable install, or the source tree on PYTHONPATH) finds them at the repository's top level.
This module is the one place that knows both homes.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent  # only meaningful in a checkout
BUNDLED = ("kernels", "ds_configs")  # folders a wheel copies into the package


def resource_dir(name: str, marker: str) -> Path:
    """The folder `name` holding `marker`: inside the installed package first, else the checkout's top level.

    `marker` is a file that only our folder has, so a checkout is never confused with an unrelated folder
    of the same name next to the package (site-packages has Hugging Face's `kernels/`, for one).
    """
    if name not in BUNDLED:
        raise ValueError(f"unknown resource folder {name!r}; one of {BUNDLED}")
    for folder in (PACKAGE_DIR / name, REPO_ROOT / name):
        if (folder / marker).is_file():
            return folder
    raise ModuleNotFoundError(f"offsite-ds is incomplete: no {name}/{marker} inside {PACKAGE_DIR} or beside it; "
                              "reinstall it (pip install offsite-ds) or run from a full checkout")
