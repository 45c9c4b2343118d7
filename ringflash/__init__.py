"""ringflash: exact ring, striped and zigzag attention over sequences sharded across GPUs."""

from .comm import HybridGroup
from .layout import Contiguous, Layout, Striped, Zigzag, get_layout
from .ops import flash_attention
from .ring import ring_attention
from .nn import MultiheadAttention, RingAttention
from .batch import shard_batch, sharded_cross_entropy

__version__ = "0.1.0"

__all__ = [
    "ring_attention",
    "flash_attention",
    "Layout",
    "Contiguous",
    "Striped",
    "Zigzag",
    "get_layout",
    "HybridGroup",
    "RingAttention",
    "MultiheadAttention",
    "shard_batch",
    "sharded_cross_entropy",
]
