"""Triton flash-attention kernels with position masks: the local kernel of every ring step.

``forward``, ``backward`` and ``backward_delta`` have :mod:`ringflash.reference`'s signatures
and contract; ``check_inputs`` says what the kernels take before anything is launched.

On the CPU the kernels run under Triton's interpreter: set ``TRITON_INTERPRET=1`` before
this package is first imported. On sm_90 GPUs, kernels written in Gluon with FlashAttention-3's
pieces (``*_hopper.py``) take the calls they serve at D = 128 by default (at every head dim they
have with ``RINGFLASH_HOPPER_FORWARD=1`` / ``RINGFLASH_HOPPER_BACKWARD=1``, never with ``=0``;
see ``attention.py``). The interpreter does not run them.
"""

from .attention import (
    BWD_DKDV_CONFIGS,
    BWD_DQ_CONFIGS,
    FWD_CONFIGS,
    INTERPRETED,
    KernelConfig,
    backward,
    backward_delta,
    check_inputs,
    forward,
)

__all__ = [
    "forward",
    "backward",
    "backward_delta",
    "check_inputs",
    "KernelConfig",
    "FWD_CONFIGS",
    "BWD_DKDV_CONFIGS",
    "BWD_DQ_CONFIGS",
    "INTERPRETED",
]
