"""Test-harness settings shared by every test.

One intra-op thread for torch (and for the `ptychodus -b` subprocesses, through
OMP_NUM_THREADS): on a 2-core machine, OpenMP's spin-waiting threads collapse when anything
else runs beside the tests (measured: N=32 training steps fell from 95 to 3.7 groups/s with one
other busy process), while a single thread costs a quiet machine little on these tiny models.
Benchmarks do not use this file and keep torch's default.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import torch  # noqa: E402 - the environment must be set before torch starts its pool

torch.set_num_threads(1)
