"""Test session set-up.

Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors. The interpreter flag is read when
a kernel is decorated, so it is set here, before any test module imports madtp_kernels.triton.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
