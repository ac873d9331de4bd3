"""Test-wide set-up.

Where no CUDA device exists (CI, developer laptops), Triton kernels run in the Triton interpreter on CPU
tensors: TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
Tests marked ``cuda`` need a real GPU and are skipped, with that reason, where none exists.
"""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Each test draws its unseeded random inputs from a seed of its own (a hash of its id), so they do not
    depend on which tests ran before it (a kernel test's tolerance once failed only in one test order)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)
