#!/usr/bin/env python3
"""Decode over a long KV cache: weft's paged cache (dense, and Quest's pages chosen on the
device) against torch SDPA's decode over a contiguous cache, in one run.

    python3 bench/paged_peers.py [--batch 1,16,64] [--context 32768,131072] [--keep 0.02]

bf16, 32 query heads over 8 KV heads, D = 128, pages of 16 tokens. Per batch and context:
- copy: a device-to-device copy's bandwidth (bytes read + written), measured once;
- sdpa-*: `scaled_dot_product_attention(q [B, 32, 1, D], k, v [B, 8, N, D], enable_gqa=True)`
  with one backend (flash, cuDNN, memory-efficient); "n/a" where the backend refuses it;
- weft dense: `PagedCache.decode(q)` (every token), its KV bytes over its time, and that as a
  share of the copy bandwidth;
- weft Quest: `PagedCache.decode(q, "retrieval(unit = page(16), keep = top_k(n), sink = 64,
  recent = 64)")` keeping `--keep` of the pages, and its speedup over the best SDPA backend.
Times are medians of triton.testing.do_bench (CUDA events). Weft's cache and the contiguous one
are not held at once, so the largest shape needs its cache's memory once, not twice.
"""

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import weft.torch as wt

HQ, HKV, D, PAGE = 32, 8, 128, 16
BACKENDS = (
    ("flash", SDPBackend.FLASH_ATTENTION),
    ("cudnn", SDPBackend.CUDNN_ATTENTION),
    ("efficient", SDPBackend.EFFICIENT_ATTENTION),
)


def bench(fn):
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def copy_gbs():
    n = 1 << 29  # 1 GiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a))
    del a, b
    return 2 * n * 2 / (t * 1e-3) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--context", default="32768,131072")
    ap.add_argument("--keep", type=float, default=0.02)
    ap.add_argument("--max-gib", type=float, default=40.0, help="skip shapes whose cache is larger")
    args = ap.parse_args()
    bw = copy_gbs()
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, hq={HQ} hkv={HKV} d={D} page={PAGE}, "
        f"Quest top_k {args.keep * 100:.1f}% of pages, sink 64, recent 64; copy {bw:.0f} GB/s (read + write)"
    )
    names = [n for n, _ in BACKENDS]
    print("| batch | context | " + " | ".join(f"sdpa-{n} ms" for n in names)
          + " | weft dense ms | dense GB/s | of copy | vs best sdpa | weft Quest ms | vs best sdpa |")
    print("|---" * (len(names) + 8) + "|")
    for n in [int(x) for x in args.context.split(",")]:
        for b in [int(x) for x in args.batch.split(",")]:
            kv_bytes = b * n * HKV * D * 2 * 2
            if kv_bytes / 2**30 > args.max_gib:
                print(f"| {b} | {n} | skipped: {kv_bytes / 2**30:.0f} GiB of cache |")
                continue
            torch.manual_seed(0)
            q = torch.randn(b, HQ, D, dtype=torch.bfloat16, device="cuda")
            k = torch.randn(b, HKV, n, D, dtype=torch.bfloat16, device="cuda")
            v = torch.randn_like(k)
            sdpa = []
            for _, backend in BACKENDS:
                try:
                    with sdpa_kernel(backend):
                        q4 = q.unsqueeze(2)
                        F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
                        sdpa.append(bench(lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)))
                except RuntimeError:
                    sdpa.append(None)
            cache = wt.PagedCache(b, HQ, HKV, D, n, page_size=PAGE)
            for s in range(b):
                cache.fill(s, k[s], v[s])
            del k, v
            torch.cuda.synchronize()
            dense = bench(lambda: cache.decode(q))
            kept = max(1, round(-(-n // PAGE) * args.keep))
            quest = f"retrieval(unit = page({PAGE}), keep = top_k({kept}), sink = 64, recent = 64)"
            cache.decode(q, quest)
            qt = bench(lambda: cache.decode(q, quest))
            del cache
            torch.cuda.empty_cache()
            best = min((t for t in sdpa if t is not None), default=None)
            gbs = kv_bytes / (dense * 1e-3) / 1e9
            cells = [f"{t:.3f}" if t is not None else "n/a" for t in sdpa]
            vs = lambda t: f"{best / t:.2f}x" if best is not None else "n/a"  # noqa: E731
            print(f"| {b} | {n} | " + " | ".join(cells)
                  + f" | {dense:.3f} | {gbs:.0f} | {100 * gbs / bw:.0f}% | {vs(dense)} | {qt:.3f} | {vs(qt)} |",
                  flush=True)


if __name__ == "__main__":
    main()
