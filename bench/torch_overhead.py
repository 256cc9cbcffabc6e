"""Host cost of one weft call from Python against the same launch queued from Rust.

    python3 bench/torch_overhead.py [--calls 2000]

A tiny problem (the GPU work is a few microseconds) so that host time dominates. Four timings,
each the median over rounds of `--calls` back-to-back calls, in microseconds per call:
- rust: `Runtime.attention(..., repeat=n)`, n layer calls in one Rust loop (no Python between);
- binding: the extension's `Runtime.attention` once per Python call (argument conversion);
- weft.torch: `weft.torch.attention` (checks, output allocation, the launch);
- torch.ops: the registered custom op, as torch.compile's graphs call it (dispatcher included);
- sdpa: torch's own `scaled_dot_product_attention` at the same shape, for scale.
"""

import argparse
import statistics
import time

import torch

import weft.torch as wt


def per_call_us(fn, calls, rounds=7):
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn(calls)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    h, n, d = args.heads, args.seq, 128
    q = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, h // 4, n, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    text = "causal"
    plan = wt.plan(text, h)
    out = wt.attention(q, k, v, plan)  # compiles, uploads the static index
    lse = torch.empty(1, h, n, device="cuda", dtype=torch.float32)
    rt = wt.runtime(q.device)
    stream = torch.cuda.current_stream().cuda_stream
    ptrs = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr())
    shape = (h, h // 4, n, n, d)
    scale = 1 / d**0.5

    def rust(c):
        rt.attention(plan.layer_plan, shape, "bf16", *ptrs, stream, scale, False, c)

    def binding(c):
        for _ in range(c):
            rt.attention(plan.layer_plan, shape, "bf16", *ptrs, stream, scale)

    def torch_op(c):
        for _ in range(c):
            wt.attention(q, k, v, plan)

    def torch_dispatch(c):
        for _ in range(c):
            torch.ops.weft.attention(q, k, v, plan.key, scale)

    def torch_text(c):
        for _ in range(c):
            wt.attention(q, k, v, text)

    kr, vr = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)

    def sdpa(c):
        for _ in range(c):
            torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)

    rows = [
        ("rust (Runtime.attention_layer in a Rust loop)", rust),
        ("binding (extension call per Python call)", binding),
        ("weft.torch.attention (Plan)", torch_op),
        ("weft.torch.attention (pattern text)", torch_text),
        ("torch.ops.weft.attention (the op torch.compile calls)", torch_dispatch),
        ("torch SDPA (for scale)", sdpa),
    ]
    print(f"{torch.cuda.get_device_name()}, B=1 H={h} Hkv={h // 4} N={n} D={d} bf16 causal, {args.calls} calls x 7 rounds")
    res = {}
    for name, fn in rows:
        fn(50)  # warm up
        res[name] = per_call_us(fn, args.calls)
        print(f"{name:<48} {res[name]:8.2f} us/call")
    base = res[rows[0][0]]
    print(f"python overhead over rust: binding {res[rows[1][0]] - base:.2f} us, "
          f"weft.torch (Plan) {res[rows[2][0]] - base:.2f} us, (text) {res[rows[3][0]] - base:.2f} us")


if __name__ == "__main__":
    main()
