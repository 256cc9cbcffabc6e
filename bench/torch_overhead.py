"""Host cost of one weft call from Python against the same launch queued from Rust.

    python3 bench/torch_overhead.py [--calls 400]

Each row is the host time to queue `--calls` back-to-back calls while the GPU is held busy by
a sleep kernel queued first (so no row waits for the GPU, and the launch queue never fills),
the median over 7 rounds (each round runs every row), in microseconds per call:
- rust: `Runtime.attention(..., repeat=n)`, n layer calls in one Rust loop (no Python between);
- binding: the extension's `Runtime.attention` once per Python call (argument conversion);
- weft.torch: `weft.torch.attention` (checks, output allocation, the launch);
- torch.ops: the registered custom op, as torch.compile's graphs call it (dispatcher included);
- the parts of weft.torch's eager path alone (checks; output and LSE allocation);
- sdpa: torch's own `scaled_dot_product_attention` at the same shape, for scale.
"""

import argparse
import statistics
import time

import torch

import weft.torch as wt


def queue_us(fn, calls):
    """Host microseconds per call to queue `calls` calls behind a GPU sleep."""
    torch.cuda.synchronize()
    # About 50 ms of GPU sleep (at 1.5-2 GHz): longer than queueing `calls` calls takes.
    torch.cuda._sleep(100_000_000)
    t = time.perf_counter()
    fn(calls)
    us = (time.perf_counter() - t) / calls * 1e6
    torch.cuda.synchronize()
    return us


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=400)
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

    def torch_lse(c):
        for _ in range(c):
            wt.attention(q, k, v, plan, return_lse=True)

    def torch_text(c):
        for _ in range(c):
            wt.attention(q, k, v, text)

    def torch_dispatch(c):
        for _ in range(c):
            torch.ops.weft.attention(q, k, v, plan.key, scale)

    def checks(c):
        for _ in range(c):
            wt._check(q, k, v)

    def allocs(c):
        for _ in range(c):
            torch.empty_like(q)

    kr, vr = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)

    def sdpa(c):
        for _ in range(c):
            torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)

    rows = [
        ("rust (Runtime.attention_layer in a Rust loop)", rust),
        ("binding (extension call per Python call)", binding),
        ("weft.torch.attention (Plan)", torch_op),
        ("weft.torch.attention (Plan, return_lse=True)", torch_lse),
        ("weft.torch.attention (pattern text)", torch_text),
        ("torch.ops.weft.attention (what torch.compile calls)", torch_dispatch),
        ("  of weft.torch: input checks", checks),
        ("  of weft.torch: output allocation", allocs),
        ("torch SDPA (for scale)", sdpa),
    ]
    print(f"{torch.cuda.get_device_name()}, B=1 H={h} Hkv={h // 4} N={n} D={d} bf16 causal, "
          f"host time to queue {args.calls} calls, median of 7 rounds")
    for _, fn in rows:
        fn(20)  # warm up
    # Rounds interleave the rows, so that clock and cache drift touch every row alike.
    samples = {name: [] for name, _ in rows}
    for _ in range(7):
        for name, fn in rows:
            samples[name].append(queue_us(fn, args.calls))
    res = {name: statistics.median(t) for name, t in samples.items()}
    for name, _ in rows:
        print(f"{name:<52} {res[name]:8.2f} us/call")
    base = res[rows[0][0]]
    print(f"python overhead over rust: binding {res[rows[1][0]] - base:.2f} us, "
          f"weft.torch (Plan) {res[rows[2][0]] - base:.2f} us, (with LSE) {res[rows[3][0]] - base:.2f} us, "
          f"(text) {res[rows[4][0]] - base:.2f} us, torch.ops {res[rows[5][0]] - base:.2f} us")


if __name__ == "__main__":
    main()
