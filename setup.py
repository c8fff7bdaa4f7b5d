"""megawsd: WSD schedules, cooldown branches and schedule-free AdamW on DeepSpeed."""

from setuptools import find_packages, setup

setup(
    name="megawsd",
    version="0.1.0",
    description="Pretrain causal LMs on DeepSpeed without fixing the training length in advance",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megawsd", "megawsd.*"]),
    install_requires=[
        # torch first where a CPU build is wanted (see README): a bare requirement resolved on
        # its own pulls a CUDA build.
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.45",
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors",
        "numpy",
        "pyyaml",
        "pydantic>=2",
        "rich",
        "tqdm",
        "matplotlib",
        "tensorboard",
        "scipy",
        "submitit>=1.5",  # `megawsd study --executor slurm`
    ],
    extras_require={
        # megawsd.hf: transformers' Trainer and Accelerate (transformers is a base requirement).
        "hf": ["accelerate>=1.0"],
        "test": [
            "accelerate>=1.0",
            "pytest",
            "hypothesis",
            "schedulefree==1.4.1",
            "megatron-core",
            "ruff",
        ],
    },
    entry_points={"console_scripts": ["megawsd=megawsd.cli:main"]},
)
