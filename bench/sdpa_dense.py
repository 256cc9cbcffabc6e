#!/usr/bin/env python3
"""torch SDPA on dense attention, causal and not: the end-to-end baselines of index-bench.

    python3 bench/sdpa_dense.py [N ...]        (default 16384 65536; B = 1, H = 32, D = 128, bf16)

Medians of triton.testing.do_bench (CUDA events), flash and cuDNN backends.
"""
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

sizes = [int(a) for a in sys.argv[1:]] or [16384, 65536]
for n in sizes:
    q, k, v = [torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    for causal in (False, True):
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            with sdpa_kernel(backend):
                t = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                             warmup=10, rep=100, return_mode="median")
            print(f"sdpa-{name} N={n} causal={causal}: {t:.3f} ms", flush=True)
