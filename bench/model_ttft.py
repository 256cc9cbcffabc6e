"""Time to first token of a Llama-3-8B-shaped model (32 query heads, 8 KV heads, D = 128,
hidden 4096, MLP 14336, vocab 128256; random bf16 weights, which do not change the time) with
attention through weft against torch SDPA (flash and cuDNN backends) and FlexAttention, in one
run on one GPU.

    python3 bench/model_ttft.py --seqs 32768,65536,131072 --layers 4 --choices choices.json

Backends (``--backends``): ``sdpa-flash`` and ``sdpa-cudnn`` (transformers' SDPA path with one
torch backend allowed), ``flex`` (transformers' flex_attention path, compiled),
``weft-causal`` (dense causal through weft), ``weft`` (the per-head plans). The plans come from
``--choices`` (the JSON ``weft search --json`` writes, or a list of ``{layer, head, pattern
text}`` such as ``bench/data/smollm2-135m-recall95.json``): this model's layer i takes the
middle layer of the i-th of equal runs of the searched model's layers, whose heads repeat over
these 32 (a search on a smaller model's captured Q/K; the patterns keep a fixed number of keys,
so their cost does not depend on the weights), or from ``--pattern`` for every head.

``--density-only`` prints the fraction of causal pairs the plans keep at each length (on the
CPU, no GPU needed).

Each time is the median of ``--repeat`` full prefills (``logits_to_keep=1``, no KV cache,
after one warm-up) in milliseconds, the host waiting for the GPU at the end of each.
"""

import argparse
import contextlib
import json
import statistics
import sys
import time

import weft

DEFAULT_PATTERN = "causal & (sink(64) | local(64) | vertical_slash(vertical = top_k(256), slash = top_k(32)))"


def build_model(layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        num_hidden_layers=layers,
        vocab_size=128256,
        max_position_embeddings=1 << 18,
        rope_theta=500000.0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def plans_for(args, layers: int, heads: int) -> dict:
    """``{layer: weft.LayerPlan}`` for this model."""
    if not args.choices:
        one = weft.plan(args.pattern, heads)
        return {layer: one for layer in range(layers)}
    searched = load_searched(args.choices)
    keys = sorted(searched)
    plans = {}
    for layer in range(layers):
        # The middle layer of each of `layers` equal runs of the searched model's layers.
        pats = searched[keys[(2 * layer + 1) * len(keys) // (2 * layers)]]
        plans[layer] = weft.plan([pats[h % len(pats)] for h in range(heads)], heads)
    return plans


def load_searched(path: str) -> dict:
    """``{layer: [pattern per head]}`` from ``weft search --json`` output, or from any list of
    ``{"layer", "head", "pattern"}`` records whose pattern is DSL text (as
    ``tools/model_quality.py`` writes under ``configs[i].search.heads``)."""
    with open(path) as f:
        items = json.load(f)
    by_layer: dict = {}
    for c in items:
        p = weft.pattern(c["pattern"]) if isinstance(c["pattern"], str) else weft.Pattern.from_json(json.dumps(c["pattern"]))
        by_layer.setdefault(int(c["layer"]), {})[int(c["head"])] = p
    return {layer: [heads[h] for h in sorted(heads)] for layer, heads in by_layer.items()}


def density(plans: dict, n: int) -> float:
    """Mean fraction of the causal pairs the plans keep at n tokens, over every layer's heads
    (the CPU index of each distinct pattern over zero inputs: top-k budgets keep the same count
    whatever the values)."""
    import numpy as np

    kept, heads = 0.0, 0
    cache: dict = {}
    zeros = np.zeros((1, n, 1), np.float32)
    for p in plans.values():
        for pat in p.patterns:
            text = str(pat)
            if text not in cache:
                cache[text] = weft.sparse_index(pat, zeros, zeros).density
            kept += cache[text]
            heads += 1
    return kept / heads * n / ((n + 1) / 2)


def prefill_ms(model, ids, repeat: int) -> float:
    import torch

    times = []
    for i in range(repeat + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        if i:  # the first is the warm-up (kernel compiles, plans, cuDNN's choice)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def run_backend(model, name: str, ids, plans: dict, repeat: int) -> float:
    import weft.hf
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name in ("sdpa-flash", "sdpa-cudnn"):
        model.set_attn_implementation("sdpa")
        backend = SDPBackend.FLASH_ATTENTION if name == "sdpa-flash" else SDPBackend.CUDNN_ATTENTION
        with sdpa_kernel([backend]):
            return prefill_ms(model, ids, repeat)
    if name == "flex":
        model.set_attn_implementation("flex_attention")
        return prefill_ms(model, ids, repeat)
    if name == "weft-causal":
        weft.hf.apply(model, "causal", min_tokens=0)
        return prefill_ms(model, ids, repeat)
    if name == "weft":
        weft.hf.apply(model, plans, min_tokens=0)
        return prefill_ms(model, ids, repeat)
    raise ValueError(f"unknown backend {name!r}")


def attention_ms(name: str, n: int, plans: dict, repeat: int) -> float:
    """Attention alone at the model's shape (32 query heads, 8 KV heads, D = 128, causal), GPU
    time from CUDA events; for ``weft``, the mean over the layers' plans."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import weft.torch as wt

    g = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    # The calls one timing covers, and the SDPA backend allowed (none for weft).
    backends = {"sdpa-flash": [SDPBackend.FLASH_ATTENTION], "sdpa-cudnn": [SDPBackend.CUDNN_ATTENTION]}
    if name in backends:
        fns = [lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)]
    elif name == "weft-causal":
        fns = [lambda: wt.attention(q, k, v, "causal")]
    elif name == "weft":
        fns = [lambda p=wt.Plan(p): wt.attention(q, k, v, p) for p in plans.values()]
    else:
        raise ValueError(f"{name} has no attention-only timing")
    # weft's calls run outside any SDPA backend restriction.
    restrict = (lambda: sdpa_kernel(backends[name])) if name in backends else contextlib.nullcontext
    times = []
    for i in range(repeat + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with restrict():
            for f in fns:
                f()
        end.record()
        end.synchronize()
        if i:
            times.append(start.elapsed_time(end) / len(fns))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="32768,65536,131072")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--backends", default="sdpa-flash,sdpa-cudnn,flex,weft-causal,weft")
    ap.add_argument("--choices", help="per-head choices: the JSON `weft search --json` writes")
    ap.add_argument("--pattern", default=DEFAULT_PATTERN, help="one pattern for every head (without --choices)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--attention-only", action="store_true", help="time one layer's attention alone")
    ap.add_argument("--density-only", action="store_true", help="print the plans' density at each length (CPU) and stop")
    args = ap.parse_args()
    seqs = [int(s) for s in args.seqs.split(",")]
    if args.density_only:
        plans = plans_for(args, args.layers, 32)
        for n in seqs:
            print(f"{n} tokens: the plans keep {density(plans, n):.4f} of the causal pairs")
        return

    import torch

    backends = args.backends.split(",")
    if args.attention_only:
        plans = plans_for(args, args.layers, 32)
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: one layer's attention, H=32 Hkv=8 D=128 bf16")
        print("| tokens | " + " | ".join(f"{b} ms" for b in backends) + " |")
        print("|---" * (len(backends) + 1) + "|")
        for n in seqs:
            cells = []
            for name in backends:
                try:
                    with torch.inference_mode():
                        cells.append(f"{attention_ms(name, n, plans, args.repeat):.2f}")
                except Exception as e:
                    cells.append(f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                    torch.cuda.empty_cache()
            print(f"| {n} | " + " | ".join(cells) + " |", flush=True)
        return

    model = build_model(args.layers)
    heads = model.config.num_attention_heads
    plans = plans_for(args, args.layers, heads)
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Llama-3-8B-shaped, {args.layers} layers, "
        f"bf16, median of {args.repeat}",
        flush=True,
    )
    results = []
    for n in seqs:
        ids = torch.randint(0, model.config.vocab_size, (1, n), device="cuda")
        row = {"tokens": n}
        for name in backends:
            try:
                with torch.inference_mode():
                    row[name] = run_backend(model, name, ids, plans, args.repeat)
            except Exception as e:  # a peer that cannot run this size (memory, compile) is reported, not fatal
                row[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                torch.cuda.empty_cache()
            print(f"  {n:>7} {name:<12} {row[name]}", file=sys.stderr, flush=True)
        results.append(row)

    print("| tokens | " + " | ".join(f"{b} ms" for b in backends) + " | best SDPA / weft |")
    print("|---" * (len(backends) + 2) + "|")
    for row in results:
        cells = [f"{row[b]:.1f}" if isinstance(row[b], float) else row[b] for b in backends]
        sdpa = [row[b] for b in ("sdpa-flash", "sdpa-cudnn") if isinstance(row.get(b), float)]
        ratio = f"{min(sdpa) / row['weft']:.2f}x" if sdpa and isinstance(row.get("weft"), float) else "-"
        print(f"| {row['tokens']} | " + " | ".join(cells) + f" | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "layers": args.layers, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
