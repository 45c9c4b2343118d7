"""The dK/dV kernel's time (torch.profiler) in a backward on fixed LSE and delta, on fresh copies,
after a forward whose results it does not use, and after a forward whose results it uses. Run
from the repository root."""
import sys, torch
sys.path.insert(0, 'benchmarks')
from bench_kernels import inputs
from profile_kernels import profile_call
from ringflash import kernels
bf = torch.bfloat16
for S, causal in ((16384, True), (8192, False)):
    q, k, v, dout = inputs(1, S, 32, 128, bf)
    out, lse = kernels.forward(q, k, v, causal=causal, out_dtype=bf)
    delta = kernels.backward_delta(out, dout)
    fwd = lambda: kernels.forward(q, k, v, causal=causal, out_dtype=bf)
    def A():  # fixed lse, delta
        return kernels.backward(dout, q, k, v, lse, delta, causal=causal, grad_dtype=bf)
    def B():  # fresh copies of lse and delta
        return kernels.backward(dout, q, k, v, lse.clone(), delta.clone(), causal=causal, grad_dtype=bf)
    def C():  # a forward first, its results unused
        fwd(); return A()
    def D():  # fwd + bwd as the benchmark
        o, l = fwd(); d = kernels.backward_delta(o, dout)
        return kernels.backward(dout, q, k, v, l, d, causal=causal, grad_dtype=bf)
    def E():  # the forward's lse, the fixed delta
        o, l = fwd()
        return kernels.backward(dout, q, k, v, l, delta, causal=causal, grad_dtype=bf)
    def F():  # the fixed lse, the forward's delta
        o, l = fwd(); d = kernels.backward_delta(o, dout)
        return kernels.backward(dout, q, k, v, lse, d, causal=causal, grad_dtype=bf)
    def G():  # fwd + bwd, lse made contiguous copy
        o, l = fwd(); d = kernels.backward_delta(o, dout)
        return kernels.backward(dout, q, k, v, l.clone(), d.clone(), causal=causal, grad_dtype=bf)
    for rnd in range(2):
        for name, fn in (("A fixed", A), ("B clones", B), ("C fwd first", C), ("D fwdbwd", D), ("E fwd lse", E), ("F fwd delta", F), ("G fwdbwd clones", G)):
            ks, ms = profile_call(fn, 6)
            dk = sum(us for n, us in ks.items() if "dkdv" in n)
            print(f"S={S} {'causal' if causal else 'full'} round {rnd} {name:16s} dkdv {dk:8.0f} us   call {ms*1e3:8.0f} us", flush=True)
    print("lse", lse.stride(), lse.data_ptr() % 4096, "delta", delta.data_ptr() % 4096)
