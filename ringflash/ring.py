"""Ring attention over any layout: ``ring_attention``, its autograd Function and custom op.

Every rank keeps its queries; K/V shards travel around the ring, one hop per step. On step
``s`` rank ``r`` holds the K/V of rank ``src = (r - s) mod P`` and runs the local kernel with
the global positions of its queries and of ``src``'s keys, so the causal mask of any layout
(contiguous, striped, zigzag) comes out of ``q_pos >= k_pos``; windows and packed documents
add rules on the same global positions (:mod:`ringflash.mask`). Steps whose block is fully
masked are skipped, and the ring stops after the last step any rank needs (a plan made once per
batch shape and mask, on the host, from every rank's positions); where ranks need keys of both
neighbours (a two-sided window), it moves both ways if that takes fewer hops.

Forward: partial results are folded into a float32 (O, LSE) state by the backend; the output
is rounded to the input dtype once, at the end.

Backward: K/V rotate again; each rank adds its block gradients into the float32 dK/dV
sum of the K/V it holds, and the sum follows its K/V around the ring, one step behind, so the
transfer of step ``s`` overlaps the compute of step ``s + 1``. After the last step the sum
makes one more hop, in the input dtype, and lands on the rank that owns those K/V (with the
SDPA engines, whose fused op returns dQ, dK and dV together, the last step runs in two chunks
of K/V heads so that the first chunk's hop overlaps the second's compute). dQ accumulates
locally in float32. Every block uses the *global* O and LSE, and
``delta = rowsum(dO * O)`` is computed once.

Eager calls run the autograd Function; inside ``torch.compile`` the same forward and backward
run as the custom ops ``ringflash::ring_attention`` / ``ring_attention_backward``, so compiled
models keep attention in their graphs.
"""

from __future__ import annotations

import math
import os
import zlib
from collections import OrderedDict

import torch
import torch.distributed as dist

from . import comm
from .comm import Exchange, check_group_device, check_transport, make_ring, resolve_group, world_and_rank
from .layout import Contiguous, Layout, Striped, Zigzag, get_layout
from .mask import Mask, block_visible, check_cu_seqlens, check_window, doc_ids, make_mask
from .sdpa import accumulate
from .sparse import BlockSparse, HashSparse, bucket_range_problem, check_sparsity, is_token_sparsity, run_sorted
from .ops import (backend_name, backward_extras, check_backend_inputs, check_mask_backend, check_qkv,
                  check_sparsity_backend, get_backend, mask_kwargs, no_autocast, resolve_scale)

__all__ = ["ring_attention"]


_POSITIONS: dict = {}


def _positions(layout: Layout, local_seqlen: int, world_size: int, device) -> tuple[list, list]:
    """Every rank's global token positions: host copies (to decide skips without a device
    sync) and device copies (for the kernel's masks), made once per shape and cached."""
    key = (layout, local_seqlen, world_size, device)
    try:
        hit = _POSITIONS.get(key)
    except TypeError:  # a Layout with unhashable attributes: made on every call
        key, hit = None, None
    if hit is None:
        # Normal tensors even inside torch.inference_mode: they outlive the call, and inference
        # tensors have no version counter (which the SDPA engines' cache of pieces reads).
        with torch.inference_mode(False):
            # On the host whatever the default device is (torch.set_default_device, `with torch.device(...)`).
            host = [layout.local_positions(local_seqlen, rank=r, world_size=world_size, device="cpu")
                    for r in range(world_size)]
            # Built on the device, not copied there: a host-to-device copy would block the host.
            dev = [layout.local_positions(local_seqlen, rank=r, world_size=world_size, device=device)
                   for r in range(world_size)]
        hit = (host, dev)
        if key is not None:
            if len(_POSITIONS) > 256:
                _POSITIONS.clear()
            _POSITIONS[key] = hit
    return hit


class _Plan:
    """What one rank's ring does for a mask, decided on the host once per batch shape and mask
    (every rank decides alike, from every rank's positions):

    * ``need[r][src]``: whether the queries of rank ``r`` see any key of rank ``src``; steps
      without are skipped;
    * ``steps``: how many steps a ring moving forward runs: one past the last step that any
      rank needs, so a window that reaches only the previous ranks of a contiguous layout moves
      only those hops;
    * ``hops``: ``(forward, backward)``: the K/V hops of a ring that moves both ways (K/V of the
      ranks before first, then, from our own K/V again, those of the ranks after), the pair with
      the fewest hops that reaches every needed step; ``(steps - 1, 0)`` unless moving both
      ways takes strictly fewer. A two-sided window on a contiguous layout, or any window on a
      zigzag one (each rank's second chunk needs the next rank), needs the neighbours on both
      sides: two hops instead of ``P - 1``;
    * ``docs``: every rank's per-token document ids on the device (packed documents), or None.
    """

    def __init__(self, mask: Mask, pos_host: list, pos: list, device):
        P = len(pos_host)
        self.mask = mask
        self.pos_host, self.pos = pos_host, pos
        self.need = [[block_visible(mask, pos_host[r], pos_host[src]) for src in range(P)] for r in range(P)]
        needed = [s for s in range(P) if any(self.need[r][(r - s) % P] for r in range(P))]
        self.steps = max(needed) + 1 if needed else 1  # a block pattern may hide every pair
        self.hops = two_way_hops([s for s in needed if s > 0], P)
        self.docs = None
        if mask.cu_seqlens is not None:
            bounds = torch.tensor(mask.cu_seqlens, dtype=torch.int64)
            if torch.device(device).type == "cuda":
                # Pinned and asynchronous: the host does not wait for the device.
                bounds = bounds.pin_memory().to(device, non_blocking=True)
            self.docs = [doc_ids(bounds, p) for p in pos]

    def kwargs(self, r: int, src: int, attrs=None) -> dict:
        """The mask arguments of an engine call for rank ``r``'s queries and ``src``'s keys
        (with ``attrs``, the per-head attributes of QK-dropping or hashing instead)."""
        docs = (self.docs[r], self.docs[src]) if self.docs is not None else (None, None)
        kw = dict(q_pos=self.pos[r], k_pos=self.pos[src], causal=self.mask.causal, **mask_kwargs(self.mask, *docs))
        if attrs is not None:
            kw.update(attrs.kwargs(src))
        return kw


def two_way_hops(offsets: list[int], world_size: int) -> tuple[int, int]:
    """``(forward, backward)`` hops that bring every needed step ``s`` (the K/V of rank
    ``r - s``): ``s <= forward``, or ``world_size - s <= backward``; the fewest in all, moving
    forward only on a tie."""
    best = (max(offsets, default=0), 0)
    for cut in range(world_size):
        fwd = max((s for s in offsets if s <= cut), default=0)
        bwd = max((world_size - s for s in offsets if s > cut), default=0)
        if fwd + bwd < sum(best):
            best = (fwd, bwd)
    return best


def _visits(plan: _Plan, ring) -> list[tuple[int, int]]:
    """The ring's steps in order, as ``(s, direction)``: the K/V of rank ``r - direction * s``.
    Forward first (``s = 0``, our own, onwards); then, where the plan moves both ways and the
    transport sends messages of any hop, backward from ``s = 1``."""
    fwd, bwd = plan.hops if getattr(ring, "any_hop", False) else (plan.steps - 1, 0)
    return [(s, 1) for s in range(fwd + 1)] + [(s, -1) for s in range(1, bwd + 1)]


_PLANS: OrderedDict = OrderedDict()
_PLANS_KEPT = 16  # plans with documents hold every rank's document ids on the device


def _plan(layout: Layout, mask: Mask, local_seqlen: int, world_size: int, device, host_positions: bool) -> _Plan:
    """The cached :class:`_Plan` of a ring call (made once per layout, shape, device and mask)."""
    pos_host, pos = _positions(layout, local_seqlen, world_size, device)
    if host_positions:
        pos = pos_host
    key = (layout, mask, local_seqlen, world_size, device, host_positions)
    try:
        hit = _PLANS.get(key)
    except TypeError:  # a Layout with unhashable attributes
        key, hit = None, None
    if hit is None:
        with torch.inference_mode(False):
            hit = _Plan(mask, pos_host, pos, device)
        if key is not None:
            _PLANS[key] = hit
            while len(_PLANS) > _PLANS_KEPT:
                _PLANS.popitem(last=False)
    elif key is not None:
        _PLANS.move_to_end(key)
    return hit


def _fold(dst: torch.Tensor, frags, *, fresh: bool) -> None:
    """Add dK/dV fragments ``[(k0, k1, dk, dv)]`` into the stacked (2, B, Sk, Hkv, D) ``dst``.

    ``fresh``: ``dst`` holds nothing yet; the first fragment over a key range is copied in,
    later ones added, and keys no fragment covers are zeroed, so that no element is written
    twice where one write will do. Otherwise every fragment is added in place.
    """
    if not fresh:
        for k0, k1, gk, gv in frags:
            accumulate(dst[0][:, k0:k1], gk)
            accumulate(dst[1][:, k0:k1], gv)
        return
    done: list[tuple[int, int]] = []  # key ranges of dst already written, disjoint and sorted
    for k0, k1, gk, gv in frags:
        cuts = sorted({k0, k1, *(x for a, b in done for x in (a, b) if k0 < x < k1)})
        for a, b in zip(cuts[:-1], cuts[1:]):
            written = any(x <= a and b <= y for x, y in done)
            for i, g in enumerate((gk, gv)):
                accumulate(dst[i][:, a:b], g[:, a - k0:b - k0], fresh=not written)
        done = _union(done + [(k0, k1)])
    start = 0
    for a, b in done + [(dst.shape[2], dst.shape[2])]:
        if start < a:
            dst[:, :, start:a].zero_()
        start = max(start, b)


# The last step's dK/dV with an engine that returns them with its dQ in one call (the SDPA
# engines) are computed and sent to their owner in two chunks of K/V heads: the first
# (LAST_HOP_PARTS - 1 parts of the heads) is on its way while the last part is computed, so
# only the last part's hop is left exposed. Heads, not keys: each head's work is separate,
# while a cut along the keys would repeat the per-row work of the fused backward. 1 turns it
# off; a single K/V head (MQA) has nothing to cut.
LAST_HOP_PARTS = 4


def _last_chunks(Hkv: int, parts: int) -> list[tuple[int, int]]:
    """K/V head ranges of the last step, in the order they are computed and sent."""
    if parts <= 1 or Hkv < 2:
        return [(0, Hkv)]
    m = max(1, Hkv // parts)
    return [(0, Hkv - m), (Hkv - m, Hkv)]


# A transfer posted just before an attention kernel becomes ready to run at the same moment
# as that kernel (both wait for the previous step). A fused SDPA kernel that fills every SM
# with long-lived blocks then keeps NCCL's kernel from starting until it ends, and the
# transfer runs after the compute instead of under it (measured: 25-35% overlap). For engines
# that say so (``holds_sms``), the compute stream idles this long after a transfer is posted,
# so that NCCL's kernel is resident first. 0 turns it off. The Triton kernels' blocks are short:
# NCCL's kernel gets SMs as their first wave retires.
# Only from HEAD_START_MIN_RANKS ranks: on 2 x H200 (one transfer in the forward, one peer)
# it cost the cuDNN forward 3-5% at 32k and left fwd+bwd unchanged, while on 4 x H200 it
# took the forward at 32k from 352 to 468 TFLOP/s per GPU.
HEAD_START_US = 20.0
HEAD_START_MIN_RANKS = 3


def _head_start(be, device, world_size: int) -> None:
    if (HEAD_START_US > 0 and world_size >= HEAD_START_MIN_RANKS and device.type == "cuda"
            and getattr(be, "holds_sms", False)):
        torch.cuda._sleep(int(HEAD_START_US * _cycles_per_us(device)))


_CLOCKS: dict = {}


def _cycles_per_us(device) -> float:
    """SM clock cycles per microsecond (the spin kernel counts cycles)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CLOCKS:
        rate = getattr(torch.cuda.get_device_properties(index), "clock_rate", 0)  # kHz, where torch has it
        _CLOCKS[index] = rate / 1e3 if rate else 1980.0  # H100/H200 boost clock
    return _CLOCKS[index]


def _kv_buffers(ring, k, v, steps):
    """(what step 0 sends, where it receives). Our own K and V are sent as they are: no copy
    into a stacked buffer; every step sends K and V as two messages of one launch."""
    if steps == 1:
        return (k, v), None
    kv = (k.contiguous(), v.contiguous())
    return kv, ring.empty((2, *k.shape), k.dtype, k.device)


def _rotate(ring, kv, kv_next, *, more: bool):
    """After a step's transfer: the received K/V are held, and the buffer of the ones held
    before receives next (our own K/V, step 0's, are not a buffer: a second one is made when
    another transfer follows; none otherwise)."""
    free = kv
    if not isinstance(free, torch.Tensor):
        free = ring.empty(kv_next.shape, kv_next.dtype, kv_next.device) if more else None
    return kv_next, free


def _kv_bytes(k) -> int:
    return 2 * k.numel() * k.element_size()


def _union(ranges):
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


CHECK_CONSISTENCY = os.environ.get("RINGFLASH_CHECK_CONSISTENCY", "0") not in ("", "0")
"""Compare every rank's call before the first transfer of each ring forward (one all-gather of a
few integers and a host sync per call; off by default). Ranks that disagree, e.g. on the local
length, otherwise exchange buffers of different sizes: an error on some ranks and a hang or a
wrong result on others. With the check on, every rank raises a ``ValueError`` naming what
differs. ``RINGFLASH_CHECK_CONSISTENCY=1`` turns it on at import."""


def _call_signature(q, k, mask: Mask, softmax_scale, layout, be) -> dict:
    """What every rank of a ring must pass alike."""
    return {
        "batch": q.shape[0], "local_seqlen": q.shape[1], "heads": q.shape[2], "kv_heads": k.shape[2],
        "head_dim": q.shape[3], "dtype": str(q.dtype), "causal": mask.causal, "window": mask.window,
        "cu_seqlens": zlib.crc32(repr(mask.cu_seqlens).encode()),
        "blocks": (mask.blocks.block_size, mask.blocks._digest) if mask.blocks is not None else None,
        "softmax_scale": float(softmax_scale), "layout": repr(layout),
        "engine": getattr(be, "name", type(be).__name__), "transport": comm.TRANSPORT,
    }


def _check_consistency(signature: dict, group, world_size: int, device) -> None:
    """Raise ``ValueError`` on every rank if the ranks' call signatures differ."""
    codes = torch.tensor([zlib.crc32(f"{k}={v!r}".encode()) for k, v in signature.items()],
                         dtype=torch.int64, device=device)
    gathered = [torch.empty_like(codes) for _ in range(world_size)]
    dist.all_gather(gathered, codes, group=group)
    if all(torch.equal(g, gathered[0]) for g in gathered[1:]):
        return
    # Every rank saw the same codes, so every rank is here: gather the readable signatures.
    signatures = [None] * world_size
    dist.all_gather_object(signatures, signature, group=group)
    differ = [f for f in signature if len({repr(s[f]) for s in signatures}) > 1]
    detail = "; ".join(f"{f}: " + ", ".join(f"rank {i} {s[f]!r}" for i, s in enumerate(signatures)) for f in differ)
    raise ValueError(
        f"ring attention was called differently on the ranks of its group ({detail}). Every rank "
        "must pass shards of the same shapes and dtype and the same causal, window, cu_seqlens, "
        "softmax_scale, layout, backend and transport"
    )


def _preflight(q, k, mask: Mask, softmax_scale: float, layout: Layout, group, be) -> None:
    """The checks that need the resolved engine, before any communication of a ring forward
    (eager and compiled calls alike): the ranks' agreement (:data:`CHECK_CONSISTENCY`), then
    whether the engine can cut every step's mask (the SDPA engines)."""
    world_size, _ = world_and_rank(group)
    if world_size == 1:
        return
    if CHECK_CONSISTENCY:
        _check_consistency(_call_signature(q, k, mask, softmax_scale, layout, be), group, world_size, q.device)
    check_layout = getattr(be, "check_layout", None)
    if check_layout is not None:
        check_layout(layout, q.shape[1], world_size, mask.causal)


def _ring_forward(q, k, v, mask: Mask, softmax_scale: float, layout: Layout, group, be, attrs=None):
    """(out in q's dtype, float32 lse) of ring attention; the input checks are the caller's.
    ``attrs``: per-head attributes of QK-dropping or hashing (:class:`ringflash.sparse.TokenAttrs`)."""
    _preflight(q, k, mask, softmax_scale, layout, group, be)
    ring = make_ring(group, q.device, recv_bytes=2 * _kv_bytes(k))
    P, r = ring.world_size, ring.rank
    plan = _plan(layout, mask, q.shape[1], P, q.device, getattr(be, "host_positions", False))
    # The forward moves K/V one hop at a time (any transport stops early); both ways where the
    # plan says so and the transport can.
    visits = _visits(plan, ring)
    n = len(visits)

    out = lse = None
    # One step (one rank, or a window that needs no other rank's keys): nothing to fold, so an
    # engine that can store O in the inputs' dtype does, instead of float32 and a cast.
    direct = {"out_dtype": q.dtype} if n == 1 and getattr(be, "stores_input_dtype", False) else {}
    kv, kv_next = _kv_buffers(ring, k, v, n)
    own = kv
    for i, (s, direction) in enumerate(visits):
        src = (r - direction * s) % P
        pending = None
        if i < n - 1:
            s_next, d_next = visits[i + 1]
            send = own if d_next != direction else kv  # turning back: from our own K/V again
            pending = ring.exchange([send[0], send[1]], [kv_next[0], kv_next[1]], hops=d_next % P)
            _head_start(be, q.device, P)
        if plan.need[r][src]:
            out, lse = be.forward(q, kv[0], kv[1], softmax_scale=softmax_scale, out=out, lse=lse,
                                  **plan.kwargs(r, src, attrs), **direct)
        if pending is not None:
            pending.wait()
            kv, kv_next = _rotate(ring, kv, kv_next, more=i + 1 < n - 1)
    if out is None:  # a block pattern hid every key from this rank's queries
        B, S, H, _ = q.shape
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return torch.zeros_like(q), torch.full((B, H, S), -math.inf, dtype=lse_dtype, device=q.device)
    return out.to(q.dtype), lse


def _ring_backward(dout, q, k, v, out, lse, mask: Mask, softmax_scale: float, layout: Layout, group, be,
                   attrs=None):
    """(dq, dk, dv) in the inputs' dtypes, as separate tensors."""
    with no_autocast(dout.device):
        acc_dtype = torch.float32 if q.dtype != torch.float64 else q.dtype
        acc_size = torch.empty((), dtype=acc_dtype).element_size()
        # Receive buffers held at once: two K/V, two float32 dK/dV sums, the last hop.
        ring = make_ring(group, q.device, recv_bytes=3 * _kv_bytes(k) + 2 * (_kv_bytes(k) // k.element_size()) * acc_size)
        P, r = ring.world_size, ring.rank
        plan = _plan(layout, mask, q.shape[1], P, q.device, getattr(be, "host_positions", False))
        # A ring cut short returns the finished dK/dV sums to their owners in one message of
        # several hops, which only a transport with any-hop messages sends; others run every step
        # (skipping the compute of those no rank needs). A plan that moves both ways runs two
        # chains: forward from our own K/V, then backward from our own K/V again; each chain's
        # sums go home at its end (in float32, added there), the first while the second runs.
        visits = _visits(plan, ring) if getattr(ring, "any_hop", False) else [(s, 1) for s in range(P)]
        backward_steps = sum(1 for _, d in visits if d < 0)
        chains = [(1, 0, len(visits) - backward_steps)] + ([(-1, 1, backward_steps)] if backward_steps else [])
        two_way = len(chains) == 2
        extras = backward_extras(be, out)

        dout = dout.to(q.dtype).contiguous()
        delta = be.backward_delta(out, dout)
        if visits == [(0, 1)] and getattr(be, "stores_input_dtype", False):
            # One step on our own K/V: nothing moves or accumulates, so the gradients come out of
            # the engine in the inputs' dtype (no float32 sums, zero fill or casts).
            if not plan.need[r][r]:
                return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
            return be.backward(dout, q, k, v, lse, delta, softmax_scale=softmax_scale, grad_dtype=q.dtype,
                               **plan.kwargs(r, r, attrs), **extras)
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        blocks = getattr(be, "backward_blocks", None)  # engines that return dK/dV fragments
        hook = getattr(be, "dkdv_hook", False)  # engines that can run a callback before their dQ work

        def run_chain(direction, s0, n, first=None, post_next=None):
            """One chain of ``n`` steps: step ``j`` holds the K/V of rank ``r - direction * (s0 + j)``
            (``first``: the pending transfer of step 0's K/V where ``s0 = 1``). ``post_next`` posts
            the next chain's first transfer during the last step. Returns the chain's state:
            ``sent`` (where the finished sums of our own K/V arrive) and ``pending``."""
            if first is None:
                kv, kv_next = _kv_buffers(ring, k, v, n)
            else:
                first[0].wait()
                kv, kv_next = first[1], ring.empty((2, *k.shape), k.dtype, k.device) if n > 1 else None
            ret = (-direction * (s0 + n - 1)) % P  # the finished sums' hops home; 0: they are ours
            # The float32 dK/dV sum of the K/V we hold travels with them, one step behind: at step
            # j it arrives in carry[(j - 1) % 2], this rank adds its part in place and sends it on,
            # while carry[j % 2] receives the next one. Engines that fill an accumulator write
            # their part into `local` first (the incoming sum is not there yet when they start);
            # at step 0 there is nothing incoming, and they write into the buffer that is sent.
            # Engines with ``dkdv_store`` overwrite that buffer; others get it zero-filled.
            carry = [ring.empty((2, *k.shape), acc_dtype, q.device) for _ in range(min(n, 2))]
            local = torch.empty_like(carry[0]) if blocks is None and n > 1 else None
            state = {"pending": None, "passed": None, "sent": None}

            def spare():
                """A K/V-sized buffer in the input dtype for the last hop: the one no K/V transfer
                uses any more (from three ranks on), or a new one."""
                return kv_next if kv_next is not None else torch.empty((2, *k.shape), dtype=k.dtype, device=k.device)

            def pass_on(step, frags=None):
                """Add this rank's part (``frags``, or ``local``) into the sum travelling with the
                K/V held at ``step`` and send it on: to the next holder, or to the owner after the
                last step. With one chain that last hop carries finished sums, so it travels in the
                input dtype: half the bytes, and the same result, since the sum is rounded to that
                dtype on arrival anyway; with two, each chain's part stays float32 until the owner
                adds them. After a full ring the owner is the next rank; after a ring cut short it
                is ``ret`` hops on, and the message goes there directly."""
                acc = carry[(step - 1) % len(carry)]
                if step == 0:
                    if frags is not None:
                        _fold(acc, frags, fresh=True)
                else:
                    state["pending"].wait()  # acc has arrived; carry[step % 2] has been sent
                    if frags is not None:
                        _fold(acc, frags, fresh=False)
                    else:
                        acc += local
                state["passed"] = step
                if ret == 0:
                    state["sent"] = acc
                elif step < n - 1:
                    state["pending"] = ring.exchange([acc], [carry[step % 2]], hops=direction % P)
                elif two_way:
                    state["sent"] = ring.empty(acc.shape, acc.dtype, acc.device)
                    state["pending"] = ring.exchange([acc], [state["sent"]], hops=ret)
                else:
                    send = spare()
                    send.copy_(acc)
                    state["sent"] = tuple(ring.empty(t.shape, t.dtype, t.device) for t in (k, v))
                    state["pending"] = ring.exchange([send[0], send[1]], list(state["sent"]), hops=ret)

            def last_step_in_chunks(visible, chunks):
                """The last step of a ``blocks`` engine, by chunks of K/V heads: each chunk's
                finished dK/dV go to their owner as soon as they are computed, while the next
                chunk runs. Each chunk travels as one contiguous message; the owner copies the
                chunks into place once they have all arrived."""
                G = q.shape[2] // k.shape[2]
                acc = carry[(n - 2) % len(carry)]
                send_flat = spare().view(-1)
                recv_flat = ring.empty(send_flat.shape, send_flat.dtype, send_flat.device)
                works, recv, offset = [], [], 0
                for chunk, (h0, h1) in enumerate(chunks):
                    qh = slice(h0 * G, h1 * G)
                    frags = [] if not visible else blocks(
                        dout[:, :, qh], q[:, :, qh], kv[0][:, :, h0:h1], kv[1][:, :, h0:h1], lse[:, qh],
                        delta[:, qh] if delta is not None else None, dq=dq[:, :, qh],
                        **dict(kwargs, **{name: t[:, :, qh] for name, t in extras.items()}),
                    )
                    if chunk == 0:
                        state["pending"].wait()  # acc has arrived
                    part = acc[:, :, :, h0:h1]
                    _fold(part, frags, fresh=False)
                    shape = (2, k.shape[0], k.shape[1], h1 - h0, k.shape[3])
                    size = math.prod(shape)
                    send = send_flat[offset:offset + size].view(shape)
                    accumulate(send.flatten(0, 1), part.flatten(0, 1), fresh=True)  # to the input dtype
                    recv.append((h0, h1, recv_flat[offset:offset + size].view(shape)))
                    works += ring.exchange([send], [recv[-1][2]], hops=ret).works
                    if chunk + 1 < len(chunks):
                        _head_start(be, q.device, P)
                    offset += size
                state["sent"] = recv
                state["pending"] = Exchange(works)

            for step in range(n):
                src = (r - direction * (s0 + step)) % P
                kv_pending = None
                if step < n - 1:
                    kv_pending = ring.exchange([kv[0], kv[1]], [kv_next[0], kv_next[1]], hops=direction % P)
                elif post_next is not None:
                    post_next()
                if step < n - 1 or post_next is not None:
                    _head_start(be, q.device, P)  # also covers the dK/dV sums posted at the end of the previous step
                visible = plan.need[r][src]
                kwargs = dict(softmax_scale=softmax_scale, **plan.kwargs(r, src, attrs), **extras)
                chunks = _last_chunks(k.shape[2], LAST_HOP_PARTS) if step == n - 1 and ret and not two_way else []
                if blocks is not None and len(chunks) > 1:  # every rank cuts alike: the messages must match
                    last_step_in_chunks(visible, chunks)
                elif blocks is not None:
                    frags = blocks(dout, q, kv[0], kv[1], lse, delta, dq=dq, **kwargs) if visible else []
                    pass_on(step, frags)
                elif not visible:
                    pass_on(step, [])  # nothing to add (at step 0 only when a block pattern hides our own keys)
                else:
                    dkv = carry[-1] if step == 0 else local
                    if getattr(be, "dkdv_store", False):
                        kwargs["store_dkdv"] = True  # the kernel overwrites dkv: no zero fill
                    else:
                        dkv.zero_()
                    if hook:
                        # The dK/dV work is queued first; the transfer is posted before the dQ work,
                        # which it then overlaps (after the last step there is nothing else).
                        be.backward(dout, q, kv[0], kv[1], lse, delta, dq=dq, dk=dkv[0], dv=dkv[1],
                                    after_dkdv=lambda step=step: pass_on(step), **kwargs)
                    else:
                        be.backward(dout, q, kv[0], kv[1], lse, delta, dq=dq, dk=dkv[0], dv=dkv[1], **kwargs)
                    if state["passed"] != step:
                        pass_on(step)
                if kv_pending is not None:
                    kv_pending.wait()
                    kv, kv_next = _rotate(ring, kv, kv_next, more=step + 1 < n - 1)
            return state

        following = {}

        def post_backward_chain():
            """The backward chain's first K/V: our own, from the next rank."""
            buf = ring.empty((2, *k.shape), k.dtype, k.device)
            following["first"] = (ring.exchange([k.contiguous(), v.contiguous()], [buf[0], buf[1]], hops=-1 % P), buf)

        states = [run_chain(*chains[0], post_next=post_backward_chain if two_way else None)]
        if two_way:
            states.append(run_chain(*chains[1], first=following["first"]))
        for state in states:
            if state["pending"] is not None:
                state["pending"].wait()  # the last hop: the finished dK/dV of our own K/V
        if two_way:
            total = states[0]["sent"] + states[1]["sent"]
            dk, dv = total[0].to(k.dtype), total[1].to(v.dtype)
        elif isinstance(states[0]["sent"], list):  # by chunks of heads
            dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (k, v))
            for h0, h1, got in states[0]["sent"]:
                accumulate(dk[:, :, h0:h1], got[0], fresh=True)
                accumulate(dv[:, :, h0:h1], got[1], fresh=True)
        elif chains[0][2] > 1:
            # The ring's own buffers are reused by its next call: hand out copies.
            dk, dv = (t.clone() if ring.owns(t) else t for t in states[0]["sent"])
        else:
            dk, dv = (states[0]["sent"][i].to(k.dtype if i == 0 else v.dtype, copy=True) for i in (0, 1))
        return dq.to(q.dtype), dk, dv


class _RingAttention(torch.autograd.Function):
    """Ring attention in eager mode, and under torch.compile for what the custom op cannot carry
    (a Layout subclass, a backend object)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, softmax_scale, layout, group, be, attrs=None):
        out, lse = _ring_forward(q, k, v, mask, softmax_scale, layout, group, be, attrs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (mask, softmax_scale, layout, group, be, attrs)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the LSE: a launch fewer
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # a gradient of the gradient is refused, not wrong
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            # Only the LSE was used. Every rank still runs the ring's backward (its collectives
            # must match the other ranks'), with a zero output gradient.
            dout = torch.zeros_like(out)
        return (*_ring_backward(dout, q, k, v, out, lse, *ctx.args), None, None, None, None, None, None)


# -- the custom op: ring attention as one node of a torch.compile graph -----------------------
#
# The op takes only what a graph can hold: tensors, and the layout, group and engine by name.
# torch.compile traces models through it without a graph break. Eager calls take the autograd
# Function; both run _ring_forward / _ring_backward.


def _op_layout(layout: Layout):
    """(name, stripe) of a built-in layout; None for any other Layout."""
    if type(layout) in (Contiguous, Zigzag):
        return layout.name, 1
    if type(layout) is Striped:
        return layout.name, layout.stripe
    return None


def _layout_from_op(name: str, stripe: int) -> Layout:
    return Striped(stripe) if name == "striped" else get_layout(name)


def _group_from_op(group_name: str):
    if not group_name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def _mask_from_op(causal: bool, window_left: int, window_right: int, cu_seqlens, seqlen: int) -> Mask:
    """The op's mask arguments (a window of (-1, -1) is none; ``cu_seqlens`` a host tensor or None),
    checked as eager calls check them: on every rank, before any communication."""
    return make_mask(causal, (window_left, window_right), cu_seqlens, seqlen)


@torch.library.custom_op("ringflash::ring_attention", mutates_args=())
def _ring_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window_left: int, window_right: int,
    cu_seqlens: torch.Tensor | None, softmax_scale: float, layout: str, stripe: int, group_name: str, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    be = get_backend(backend, q.device)
    group = _group_from_op(group_name)
    mask = _mask_from_op(causal, window_left, window_right, cu_seqlens, q.shape[1] * world_and_rank(group)[0])
    with no_autocast(q.device):
        return _ring_forward(q, k, v, mask, softmax_scale, _layout_from_op(layout, stripe), group, be)


@_ring_op.register_fake
def _(q, k, v, causal, window_left, window_right, cu_seqlens, softmax_scale, layout, stripe, group_name, backend):
    B, S, H, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # the engines' LSE
    return q.new_empty(q.shape), q.new_empty((B, H, S), dtype=lse_dtype)


@torch.library.custom_op("ringflash::ring_attention_backward", mutates_args=())
def _ring_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, causal: bool, window_left: int, window_right: int, cu_seqlens: torch.Tensor | None,
    softmax_scale: float, layout: str, stripe: int, group_name: str, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    be = get_backend(backend, q.device)
    group = _group_from_op(group_name)
    mask = _mask_from_op(causal, window_left, window_right, cu_seqlens, q.shape[1] * world_and_rank(group)[0])
    return _ring_backward(dout, q, k, v, out, lse, mask, softmax_scale, _layout_from_op(layout, stripe), group, be)


@_ring_bwd_op.register_fake
def _(dout, q, k, v, out, lse, causal, window_left, window_right, cu_seqlens, softmax_scale, layout, stripe,
      group_name, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, *args = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.args = args


def _op_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _ring_bwd_op(dout.contiguous(), q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_ring_op.register_autograd(_op_backward, setup_context=_setup_context)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    cu_seqlens=None,
    layout: str | Layout = "striped",
    softmax_scale: float | None = None,
    group=None,
    return_lse: bool = False,
    backend: str | None = None,
    sparsity=None,
):
    """Exact attention over a sequence sharded across the ranks of ``group``.

    Every rank passes its own shards, cut from the full sequence by ``layout`` (see
    :mod:`ringflash.layout`; e.g. ``get_layout("striped").shard(x, rank=r, world_size=P)``).
    The result on each rank is that rank's shard of ordinary softmax attention over the
    whole sequence.

    Every rank of the group must make the same calls, in the same order, with shards of the
    same shapes and dtype cut by the layout the call names, and the same ``causal``, ``window``,
    ``cu_seqlens``, ``softmax_scale``, ``backend`` and transport. A call that differs between
    ranks is not detected by default and may hang or return wrong results;
    ``RINGFLASH_CHECK_CONSISTENCY=1`` compares the ranks' calls first (one small all-gather) and
    raises ``ValueError`` on every rank naming what differs.

    Args:
        q: (batch_size, local_seqlen, nheads, headdim)
        k, v: (batch_size, local_seqlen, nheads_kv, headdim); ``nheads % nheads_kv == 0``.
            Only the K/V heads travel around the ring.
        causal: global causal mask (token at position ``i`` sees token ``j`` iff ``i >= j``).
        window: ``(left, right)`` sliding window on global positions: the query at ``p`` sees
            keys in ``[p - left, p + right]``, -1 leaving a side unbounded (flash-attn's
            ``window_size``); combines with ``causal`` and documents. Steps with no key in reach
            are skipped, and the ring stops after the last step any rank needs (a causal window
            no longer than a contiguous shard moves one hop, not P - 1).
        cu_seqlens: document boundaries of the whole packed sequence, ``[0, end_0, ..., S]``
            with ``S = local_seqlen * P``, strictly increasing, the same on every rank (a list
            or a CPU tensor costs nothing; a CUDA tensor costs a device synchronisation per
            call; under ``torch.compile`` pass a CPU tensor). A query sees only keys of its own
            document. Any document lengths; the same boundaries apply to every row of the batch.
        layout: ``"contiguous"``, ``"striped"``, ``"zigzag"`` or a :class:`~ringflash.layout.Layout`.
        softmax_scale: defaults to ``1 / sqrt(headdim)``.
        group: a ProcessGroup or 1-D DeviceMesh (default: the world); without an initialised
            process group this is plain single-device attention. A
            :class:`~ringflash.comm.HybridGroup` runs Ulysses inside its Ulysses groups and the
            ring across them (:mod:`ringflash.ulysses`), on shards cut by ``layout`` over all
            of its ranks. Transfers go through the
            group's point-to-point operations, or through the copy engine when
            ``ringflash.comm.TRANSPORT = "copy_engine"`` (GPUs of one node; :mod:`ringflash.comm`).
        return_lse: also return the log-sum-exp (natural log), (batch_size, nheads, local_seqlen),
            in float32 (float64 for float64 inputs).
        backend: the local engine: ``"triton"`` (default on CUDA), ``"reference"`` (default on
            the CPU), or PyTorch's fused ``"cudnn"`` / ``"sdpa_flash"`` kernels (see
            :mod:`ringflash.sdpa`).
        sparsity: a sparse mode of :mod:`ringflash.sparse` (triton and reference engines; with
            a :class:`~ringflash.comm.HybridGroup` too, see :mod:`ringflash.ulysses`):
            :class:`~ringflash.sparse.BlockSparse`, a pattern over global blocks, the same on
            every rank, that must tile the global length; steps with no kept block are skipped.
            :class:`~ringflash.sparse.QKDrop` / :class:`~ringflash.sparse.HashSparse`: this
            rank's keep flags or bucket ids, (batch, local_seqlen, heads) for the queries and
            (batch, local_seqlen, nheads_kv) for the keys; the keys' composite positions are
            gathered from every rank once per call. A dropped query, or one whose bucket holds
            no key it may see, gets O = 0 and LSE = -inf.

    Returns:
        out: (batch_size, local_seqlen, nheads, headdim) in q's dtype; and lse if ``return_lse``.
        A query that sees no key (possible only with a window that excludes the query's own
        position) gets O = 0 and LSE = -inf.

    Raises:
        TypeError: q, k, v are not floating-point tensors, or of a dtype the engine does not take.
        ValueError: raised on every rank before any communication, naming what to change, for:
            shapes that do not fit together (batch, heads, head_dim, q and k/v local lengths);
            a local length the layout cannot give over this group; tensors on a device the
            group's backend cannot move or the engine cannot run on; a rank outside ``group``;
            a non-positive ``softmax_scale``; a ``window`` other than a pair of ints >= -1;
            ``cu_seqlens`` not starting at 0, not ending at the global length, not strictly
            increasing, of a float dtype or not 1-D; windows or documents with an engine that
            cannot serve them (only ``backend="triton"`` and ``"reference"`` do); a transport
            that cannot serve the group; with ``RINGFLASH_CHECK_CONSISTENCY``, ranks whose
            calls differ. With ``sparsity``: keep flags or bucket ids of the wrong shape, dtype
            or device, ``num_buckets < 1``, bucket ids outside ``[0, num_buckets)`` on any rank
            (one all-gather of a flag, unless ``checked=True``), a block pattern that does not
            tile the global length, an engine without sparse modes.
    """
    # Every check below is local and raises on every rank before any communication.
    check_qkv(q, k, v)
    layout = get_layout(layout)
    group = resolve_group(group)
    if isinstance(group, comm.HybridGroup):
        from .ulysses import hybrid_attention

        return hybrid_attention(q, k, v, causal=causal, window=window, cu_seqlens=cu_seqlens, layout=layout,
                                softmax_scale=softmax_scale, group=group, return_lse=return_lse, backend=backend,
                                sparsity=sparsity)
    world_size, _ = world_and_rank(group)
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"ring attention needs q and k/v shards of the same tokens; got local lengths "
            f"{q.shape[1]} (q) and {k.shape[1]} (k, v)"
        )
    layout.check_local_seqlen(q.shape[1], world_size)
    check_group_device(group, q.device)
    check_transport(comm.TRANSPORT, group, q.device)
    softmax_scale = resolve_scale(softmax_scale, q.shape[-1])
    check_sparsity(sparsity, q, k, q.shape[1] * world_size, check_range=False)
    check_sparsity_backend(backend, sparsity)
    if isinstance(sparsity, HashSparse) and not sparsity.checked:
        # Ids out of range on one rank must stop every rank: one all-gather of a flag.
        problem = bucket_range_problem(sparsity)
        if world_size > 1:
            flags = comm.all_gather_tensor(torch.tensor([bool(problem)], device=q.device), group)
            bad = [r for r, f in enumerate(flags.flatten().tolist()) if f]
            if bad and not problem:
                problem = f"bucket ids out of [0, num_buckets) on rank(s) {bad} of the group"
        if problem:
            raise ValueError(problem)
    spec = _op_layout(layout)
    if (torch.compiler.is_compiling() and spec is not None and (backend is None or isinstance(backend, str))
            and sparsity is None):
        # Inside torch.compile: the custom op, one node of the graph. The boundaries' values are
        # checked inside the op (reading them here would specialise the graph on them).
        name = backend_name(backend, q.device)
        check_backend_inputs(name, q, k, v)
        win = check_window(window) or (-1, -1)
        cu = _op_cu_seqlens(cu_seqlens)
        check_mask_backend(name, Mask(bool(causal), check_window(window), () if cu is not None else None))
        out, lse = _ring_op(q, k, v, bool(causal), *win, cu, float(softmax_scale), *spec, _group_name(group), name)
        lse = lse.detach()  # as from the autograd Function: no gradient flows through the LSE
    else:
        blocks = sparsity if isinstance(sparsity, BlockSparse) else None
        mask = make_mask(causal, window, cu_seqlens, q.shape[1] * world_size, blocks=blocks)
        check_mask_backend(backend, mask)
        be = get_backend(backend, q.device)
        check_mask_backend(be, mask)
        check_sparsity_backend(be, sparsity)
        if getattr(be, "check", None) is not None:
            be.check(q, k, v)
        if is_token_sparsity(sparsity):
            out, lse = _apply_sorted(q, k, v, mask, float(softmax_scale), layout, group, be, sparsity)
        else:
            out, lse = _apply_function(q, k, v, mask, float(softmax_scale), layout, group, be)
    return (out, lse) if return_lse else out


@torch.compiler.disable
def _apply_sorted(q, k, v, mask, softmax_scale, layout, group, be, sparsity):
    """Ring attention with QK-dropping or hash buckets: every rank sorts its tokens per head
    (:func:`ringflash.sparse.run_sorted`), gathers every rank's key attributes once, and runs the
    ring on the sorted tokens with per-head attributes."""
    world_size, rank = world_and_rank(group)
    with no_autocast(q.device):
        plan = _plan(layout, mask, q.shape[1], world_size, q.device, getattr(be, "host_positions", False))
        docs = plan.docs[rank] if plan.docs is not None else None
        n_docs = 1 if mask.cu_seqlens is None else len(mask.cu_seqlens) - 1

        def gather(t):
            return comm.all_gather_tensor(t, group)

        def call(qs, ks, vs, attrs):
            return _RingAttention.apply(qs, ks, vs, mask, softmax_scale, layout, group, be, attrs)

        return run_sorted(sparsity, q, k, v, plan.pos[rank], plan.pos[rank], docs, docs, n_docs, call, gather)


def _op_cu_seqlens(cu_seqlens):
    """``cu_seqlens`` as the custom op takes it: None, or a 1-D integer tensor on the host."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        cu = check_cu_seqlens(cu_seqlens)
        return None if cu is None else torch.tensor(cu, dtype=torch.int64)
    elif cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool \
            or cu_seqlens.dim() != 1:
        check_cu_seqlens(cu_seqlens)  # raises the eager call's ValueError
    return cu_seqlens.to("cpu", torch.int64)


# The autograd Function path talks to other ranks from Python: torch.compile runs it eagerly,
# across a graph break.
@torch.compiler.disable
def _apply_function(q, k, v, mask, softmax_scale, layout, group, be):
    with no_autocast(q.device):
        return _RingAttention.apply(q, k, v, mask, softmax_scale, layout, group, be)


def _group_name(group) -> str:
    """The name the custom op resolves ``group`` by ("" for the default group or none)."""
    return "" if group is None else group.group_name
