"""Which SDPA backend PyTorch picks with no sdpa_kernel context (what torch CP then uses)."""
import torch
from torch.nn.attention import SDPBackend
print(torch.__version__, torch.cuda.get_device_name())
for hkv in (32, 8):
    for causal in (True, False):
        q = torch.randn(1, 32, 16384, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, hkv, 16384, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        kw = {"enable_gqa": True} if hkv != 32 else {}
        c = torch._fused_sdp_choice(q, k, v, is_causal=causal, **kw)
        print(f"Hkv={hkv} causal={causal}: {SDPBackend(c).name}")
