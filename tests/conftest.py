import os
import sys

import torch

# Spawned test processes import helpers (tests/distributed.py) from here.
sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels run under Triton's interpreter. triton.jit decides at
# definition time, and Triton reads the variable again at launch, so it is set for the whole
# process before anything imports ringflash.kernels (the reference backend never reads it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionfinish(session, exitstatus):
    # The multi-GPU modules share one process group for the whole session (under torchrun);
    # it is destroyed once, here.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
