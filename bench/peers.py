#!/usr/bin/env python3
"""Times the peers on the inputs and masks `weft-bench` wrote, and prints one table.

torch SDPA (flash and cuDNN backends) and FlexAttention without a mask for the dense case,
the same with `is_causal` / a causal block mask for the causal case;
FlexAttention with the same block mask (block cases) or the same token-level mask (vertical
vector cases); for the causal vertical-vector cases (cvv), SDPA's causal flash and cuDNN (their
TFLOP/s on the causal half's pairs: the dense prefill a sparse one replaces) and Flex with the
token mask under causality. Every time is the median of triton.testing.do_bench (CUDA events). Ratios are
peer time / weft time: above 1 means weft is faster.
"""
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from triton.testing import do_bench

D = 128
data = sys.argv[1] if len(sys.argv) > 1 else "bench-data"
ours = [json.loads(l) for l in open(os.path.join(data, "ours.jsonl"))]
flex = torch.compile(flex_attention, dynamic=False)


def load(name, n, h):
    raw = np.fromfile(os.path.join(data, f"{name}_{n}.bf16"), dtype=np.uint16)
    return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).reshape(1, h, n, D).cuda()


def bench(fn):
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def flex_vv(peers, case, n, q, k, v, causal):
    """FlexAttention over a vertical-vector case's token mask (the sink, the band of 64-key
    blocks around the diagonal, the case's columns; under causality for the cvv cases)."""
    if n > int(os.environ.get("FLEX_VV_MAX_N", "16384")):
        # FlexAttention's block mask for a token-level mask compiles for minutes (196 s at
        # N = 16384 on the H200): above FLEX_VV_MAX_N it is not run.
        print(f"flex {case} N={n}: not run (FLEX_VV_MAX_N)", flush=True)
        return
    nqb = n // 128
    cols = np.fromfile(os.path.join(data, f"{case}_{n}.u32"), dtype=np.uint32).reshape(nqb, -1)
    table = torch.zeros(nqb, n, dtype=torch.bool, device="cuda")
    # Rows are padded with key 0, which the sink keeps anyway.
    table.scatter_(1, torch.from_numpy(cols.astype(np.int64)).cuda(), True)

    def mask_mod(b, hh, qi, ki):
        qb, kb = qi // 128, ki // 64
        kept = (ki < 64) | ((kb >= 2 * qb - 1) & (kb <= 2 * qb + 1)) | table[qb, ki]
        return kept & (ki <= qi) if causal else kept

    t0 = time.time()
    bm = torch.compile(create_block_mask)(mask_mod, None, None, n, n, device="cuda", BLOCK_SIZE=128)
    peers["flex"] = bench(lambda: flex(q, k, v, block_mask=bm))
    print(f"flex {case} N={n}: block mask + first call {time.time() - t0:.1f} s, "
          f"blocks kept {100 - bm.sparsity():.1f}%", flush=True)


rows = []  # (case, n, density, kernel, ms, tflops)
inputs = {}
for r in ours:
    case, n, h, density = r["case"], r["n"], r["heads"], r["density"]
    if n not in inputs:
        inputs.clear()
        torch.cuda.empty_cache()
        inputs[n] = tuple(load(x, n, h) for x in "qkv")
    q, k, v = inputs[n]
    flops = 4.0 * r["pairs"] * D
    rows.append((case, n, density, "weft", r["ms"], flops / r["ms"] / 1e9))
    peers = {}
    if case == "dense":
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            peers["sdpa-flash"] = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            peers["sdpa-cudnn"] = bench(lambda: F.scaled_dot_product_attention(q, k, v))
            ref = F.scaled_dot_product_attention(q, k, v)
        peers["flex"] = bench(lambda: flex(q, k, v))
        path = os.path.join(data, f"out_dense_{n}.bf16")
        if os.path.exists(path):
            mine = np.fromfile(path, dtype=np.uint16).view(np.int16)
            mine = torch.from_numpy(mine).view(torch.bfloat16).reshape(1, h, n, D).cuda().float()
            err = ((mine - ref.float()).norm() / ref.float().norm()).item()
            print(f"check: weft dense N={n} vs SDPA cuDNN: relative error {err:.2e}", flush=True)
    elif case == "causal":
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            peers["sdpa-flash"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            peers["sdpa-cudnn"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        t0 = time.time()
        bm = create_block_mask(lambda b, hh, qi, ki: qi >= ki, None, None, n, n, device="cuda", BLOCK_SIZE=128)
        peers["flex"] = bench(lambda: flex(q, k, v, block_mask=bm))
        print(f"flex causal N={n}: block mask + first call {time.time() - t0:.1f} s", flush=True)
    elif case.startswith("block"):
        nb = n // 128
        kept = np.fromfile(os.path.join(data, f"{case}_{n}.u32"), dtype=np.uint32).reshape(h, nb, -1)
        per_row = kept.shape[2]
        idx = torch.zeros(1, h, nb, nb, dtype=torch.int32, device="cuda")
        idx[..., :per_row] = torch.from_numpy(kept.astype(np.int32)).cuda()
        full_num = torch.full((1, h, nb), per_row, dtype=torch.int32, device="cuda")
        zeros = torch.zeros(1, h, nb, dtype=torch.int32, device="cuda")
        t0 = time.time()
        bm = BlockMask.from_kv_blocks(zeros, idx.clone(), full_num, idx, BLOCK_SIZE=128)
        peers["flex"] = bench(lambda: flex(q, k, v, block_mask=bm))
        print(f"flex {case} N={n}: block mask + first call {time.time() - t0:.1f} s", flush=True)
    elif case.startswith("cvv"):
        # A decoder's prefill: the dense baselines are SDPA's causal backends; Flex takes the
        # same token mask under causality (up to FLEX_VV_MAX_N, as the vv cases).
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            peers["sdpa-flash-causal"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            peers["sdpa-cudnn-causal"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        flex_vv(peers, case, n, q, k, v, causal=True)
    elif case.startswith("vv"):
        flex_vv(peers, case, n, q, k, v, causal=False)
    for name, ms in peers.items():
        # Peers compute the same pairs (Flex: the same mask) so the same FLOP count; the causal
        # dense baselines of the cvv cases compute the causal half, and are rated on it.
        pairs = h * n * (n + 1) / 2 if name.endswith("-causal") else r["pairs"]
        rows.append((case, n, density, name, ms, 4.0 * pairs * D / ms / 1e9))
    # Each case's times as soon as they are known, so that a run cut short keeps them.
    mine = next(x[4] for x in rows if x[0] == case and x[1] == n and x[3] == "weft")
    done = ", ".join(f"{name} {ms:.3f} ms ({ms / mine:.2f})" for name, ms in peers.items() if name != "weft")
    print(f"done {case} N={n}: weft {mine:.3f} ms; {done or 'no peers'}", flush=True)

print()
print(f"| case | N | density | kernel | time (ms) | TFLOP/s | peer / weft |")
print(f"|---|---|---|---|---|---|---|")
for case, n, density, name, ms, tf in rows:
    mine = next(x[4] for x in rows if x[0] == case and x[1] == n and x[3] == "weft")
    print(f"| {case} | {n} | {100 * density:.2f}% | {name} | {ms:.3f} | {tf:.0f} | {ms / mine:.2f} |")
