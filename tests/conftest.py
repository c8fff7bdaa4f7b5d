"""Test-wide environment.

TRITON_INTERPRET must be set before any module with ``@triton.jit`` is imported, so it is set
here, at collection time, on machines without CUDA: the Triton kernels then run on the CPU
through Triton's interpreter and are tested against the reference implementation.
DS_ACCELERATOR=cpu makes DeepSpeed pick its CPU accelerator (gloo) in every spawned rank.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
