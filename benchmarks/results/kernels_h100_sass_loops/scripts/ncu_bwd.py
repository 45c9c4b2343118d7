"""One forward+backward at S, causal or full, D=128, for ncu of the Hopper dK/dV(+dQ) kernel."""
import sys, torch
from ringflash import flash_attention
S = int(sys.argv[1]); causal = sys.argv[2] == "causal"
H, D = 32, 128
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(1, S, H, D, generator=g, device="cuda").bfloat16().requires_grad_() for _ in range(3))
for _ in range(3):
    o = flash_attention(q, k, v, causal=causal, backend="triton")
    o.backward(torch.ones_like(o))
torch.cuda.synchronize()
