"""weft.torch on a CUDA GPU against torch SDPA with an explicit mask (weft.mask, the CPU
reference's index). Skipped, saying why, without torch or a CUDA device."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the GPU tests need torch with CUDA")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the GPU tests need one", allow_module_level=True)

import weft  # noqa: E402
import weft.torch as wt  # noqa: E402

F = torch.nn.functional

PATTERNS = [
    "causal",
    "causal & window(200)",
    "sink(16) | local(100)",
    "causal & (sink(64) | local(64) | vertical_vector(q_block = 128, keep = top_k(100)))",
    "causal & (sink(64) | local(64) | vertical_vector(q_block = 64, keep = top_p(0.9)))",
    "block(keep = top_k(4))",
    "causal & vertical_slash(vertical = top_k(64), slash = top_k(8))",
]


def inputs(b, h, hkv, n, d, dtype, seed, nk=None):
    g = torch.Generator(device="cuda").manual_seed(seed)
    nk = nk or n
    q = torch.randn(b, h, n, d, generator=g, device="cuda").to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g, device="cuda").to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g, device="cuda").to(dtype)
    return q, k, v


def masks_of(pattern, q, k):
    """[B, H, N, Nk] boolean masks from weft's CPU index over the same (rounded) values."""
    out = []
    for b in range(q.shape[0]):
        qb, kb = q[b].float().cpu().numpy(), k[b].float().cpu().numpy()
        ix = weft.sparse_index(pattern, qb, kb)
        out.append(np.stack([ix.dense_mask(h) for h in range(q.shape[1])]))
    return torch.from_numpy(np.stack(out)).cuda()


def sdpa_reference(q, k, v, mask, scale):
    """Float32 SDPA over the mask (GQA expanded), and the log-sum-exp of the kept scores."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    qf = q.float()
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale)
    s = (qf @ kf.transpose(-1, -2)) * scale
    lse = torch.logsumexp(s.masked_fill(~mask, float("-inf")), dim=-1)
    empty = ~mask.any(dim=-1)
    return out.masked_fill(empty[..., None], 0.0), lse


def poison(*shapes_dtypes):
    """Fill the caching allocator's free blocks with NaN: outputs weft leaves unwritten show."""
    junk = [torch.full(s, float("nan"), dtype=dt, device="cuda") for s, dt in shapes_dtypes]
    del junk


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=["gqa4", "mha"])
def test_matches_sdpa_with_the_patterns_mask(pattern, dtype, d, heads):
    h, hkv = heads
    b, n = 2, 1000  # not a multiple of any tile
    q, k, v = inputs(b, h, hkv, n, d, dtype, seed=hash((pattern, d, h)) % 1000)
    poison(((b, h, n, d), dtype), ((b, h, n), torch.float32))
    out, lse = wt.attention(q, k, v, pattern, return_lse=True)
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (b, h, n)
    mask = masks_of(pattern, q, k)
    want, want_lse = sdpa_reference(q, k, v, mask, 1 / math.sqrt(d))
    assert not torch.isnan(out).any(), "rows left unwritten"
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)
    kept = mask.any(dim=-1)
    torch.testing.assert_close(lse[kept], want_lse[kept], atol=1e-2, rtol=1e-3)
    assert torch.isneginf(lse[~kept]).all()


def test_cross_length_causal_and_scale():
    # Fewer queries than keys (a chunk at the end of a prefix): causal aligns the last query
    # with the last key.
    q, _, _ = inputs(1, 4, 4, 300, 64, torch.bfloat16, seed=1)
    _, k, v = inputs(1, 4, 4, 300, 64, torch.bfloat16, seed=2, nk=777)
    out = wt.attention(q, k, v, "causal", scale=0.05)
    mask = masks_of("causal", q, k)
    assert mask[0, 0, -1].all() and not mask[0, 0, 0, 478:].any()
    want, _ = sdpa_reference(q, k, v, mask, 0.05)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


def test_per_head_plan():
    pats = ["causal", "causal & window(64)", "causal & (sink(16) | local(32))", "causal & window(300)"]
    q, k, v = inputs(1, 4, 2, 513, 128, torch.bfloat16, seed=3)
    p = wt.plan(pats, 4)
    out = wt.attention(q, k, v, p)
    for h, text in enumerate(pats):
        mask = masks_of(text, q[:, h : h + 1], k[:, h // 2 : h // 2 + 1])
        want, _ = sdpa_reference(q[:, h : h + 1], k[:, h // 2 : h // 2 + 1], v[:, h // 2 : h // 2 + 1], mask, 1 / math.sqrt(128))
        torch.testing.assert_close(out[:, h : h + 1].float(), want, atol=2e-2, rtol=2e-2)


def test_per_head_dynamic_plan():
    # Heads sharing a dynamic pattern get their index built on the GPU over just those heads.
    pats = [PATTERNS[3], "causal & window(64)", PATTERNS[6], PATTERNS[3], "block(keep = top_k(4))", PATTERNS[6]]
    h, hkv = 6, 3
    q, k, v = inputs(1, h, hkv, 1000, 128, torch.bfloat16, seed=11)
    out = wt.attention(q, k, v, wt.plan(pats, h))
    for head, text in enumerate(pats):
        g = head // (h // hkv)
        qh, kh, vh = q[:, head : head + 1], k[:, g : g + 1], v[:, g : g + 1]
        want, _ = sdpa_reference(qh, kh, vh, masks_of(text, qh, kh), 1 / math.sqrt(128))
        torch.testing.assert_close(out[:, head : head + 1].float(), want, atol=2e-2, rtol=2e-2)
    lse = torch.empty(1, h, 1000, device="cuda")
    ptrs = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr())
    stream = torch.cuda.current_stream().cuda_stream
    reports = wt.runtime().attention(wt.plan(pats, h).layer_plan, (h, hkv, 1000, 1000, 128), "bf16", *ptrs, stream, None, True)
    torch.cuda.synchronize()
    assert all(r["index_on_gpu"] for r in reports if any(not weft.pattern(pats[x]).is_static for x in r["heads"])), reports


def test_runs_on_the_current_stream():
    q, k, v = inputs(1, 8, 8, 2048, 128, torch.bfloat16, seed=4)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = wt.attention(q, k, v, "causal & window(512)")
        # Queued on `s`: a copy on `s` right after sees the result without any synchronisation.
        copy = out.clone()
    torch.cuda.current_stream().wait_stream(s)
    want, _ = sdpa_reference(q, k, v, masks_of("causal & window(512)", q, k), 1 / math.sqrt(128))
    torch.testing.assert_close(copy.float(), want, atol=2e-2, rtol=2e-2)


def test_torch_compile_traces_without_graph_breaks():
    q, k, v = inputs(2, 4, 2, 600, 64, torch.bfloat16, seed=5)
    p = wt.plan("causal & window(128)", 4)

    def layer(q, k, v):
        a = wt.attention(q, k, v, "causal")
        b = wt.attention(q, k, v, p)
        return a * 2 + b

    compiled = torch.compile(layer, fullgraph=True)  # raises on a graph break
    got = compiled(q, k, v)
    torch.testing.assert_close(got, layer(q, k, v), atol=0, rtol=0)


def test_eager_calls_match_the_registered_op():
    # Eager inference skips the op dispatcher; both must launch the same kernels.
    q, k, v = inputs(3, 8, 2, 333, 128, torch.float16, seed=9)
    p = wt.plan("causal & (sink(16) | local(64))", 8)
    scale = 0.1
    direct, direct_lse = wt.attention(q, k, v, p, scale=scale, return_lse=True)
    op, op_lse = torch.ops.weft.attention(q, k, v, p.key, scale)
    torch.testing.assert_close(direct, op, atol=0, rtol=0)
    torch.testing.assert_close(direct_lse, op_lse, atol=0, rtol=0)


def test_an_lse_nobody_asked_for_goes_to_a_kept_scratch_buffer():
    wt._lse_scratch.clear()
    q, k, v = inputs(2, 8, 2, 300, 64, torch.bfloat16, seed=12)
    want, _ = wt.attention(q, k, v, "causal", return_lse=True)
    assert not wt._lse_scratch, "a returned LSE is the caller's own tensor"
    torch.testing.assert_close(wt.attention(q, k, v, "causal"), want, atol=0, rtol=0)
    bufs = wt._lse_scratch[q.get_device()]
    assert len(bufs) == 1 and bufs[0].tensor.numel() >= 2 * 8 * 300
    # A larger call adds a larger buffer and keeps the first (a graph may still write it).
    q2, k2, v2 = inputs(2, 8, 2, 900, 64, torch.bfloat16, seed=13)
    wt.attention(q2, k2, v2, "causal")
    assert len(bufs) == 2 and bufs[1].tensor.numel() >= 2 * 8 * 900
    # While capturing, a call the scratch is too small for gets its own LSE from the graph's pool.
    q3, k3, v3 = inputs(4, 8, 2, 1000, 64, torch.bfloat16, seed=14)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        wt.attention(q3, k3, v3, "causal", return_lse=True)  # plans built outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = wt.attention(q3, k3, v3, "causal")
    assert len(bufs) == 2
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, wt.attention(q3, k3, v3, "causal"), atol=0, rtol=0)


@pytest.mark.parametrize("pattern", ["causal", "causal & (sink(64) | local(64) | vertical_vector(q_block = 128, keep = top_k(100)))"])
def test_cuda_graph_capture_and_replay(pattern):
    q, k, v = inputs(1, 8, 2, 1024, 128, torch.bfloat16, seed=6)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        wt.attention(q, k, v, pattern)  # compiles the kernel and builds the static plans
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = wt.attention(q, k, v, pattern)
    fresh = inputs(1, 8, 2, 1024, 128, torch.bfloat16, seed=7)
    for dst, src in zip((q, k, v), fresh):
        dst.copy_(src)
    g.replay()
    torch.cuda.synchronize()
    want, _ = sdpa_reference(q, k, v, masks_of(pattern, q, k), 1 / math.sqrt(128))
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("layout", ["thd", "htd"])
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 128), (torch.float16, 64)])
def test_varlen_matches_each_sequence(layout, dtype, d):
    # Lengths not multiples of the blocks, one cross-length sequence, GQA, static and dynamic
    # patterns per head; poisoned allocator memory.
    seqs = [(300, 300), (1000, 1000), (77, 77), (50, 413)]
    pats = ["causal & window(200)", PATTERNS[3], "causal", "sink(16) | local(100)"]
    h, hkv = 4, 2
    parts = [inputs(1, h, hkv, nq, d, dtype, seed=20 + i, nk=nk) for i, (nq, nk) in enumerate(seqs)]
    q = torch.cat([x[0][0] for x in parts], dim=1)  # [H, total, D]
    k = torch.cat([x[1][0] for x in parts], dim=1)
    v = torch.cat([x[2][0] for x in parts], dim=1)
    cu_q = [0]
    cu_k = [0]
    for nq, nk in seqs:
        cu_q.append(cu_q[-1] + nq)
        cu_k.append(cu_k[-1] + nk)
    args = (q, k, v) if layout == "htd" else tuple(t.transpose(0, 1).contiguous() for t in (q, k, v))
    out, lse = wt.attention_varlen(
        *args, torch.tensor(cu_q), torch.tensor(cu_k, device="cuda"), wt.plan(pats, h), return_lse=True, layout=layout
    )
    if layout == "thd":
        out = out.transpose(0, 1)
    scale = 1 / math.sqrt(d)
    for i, (qs, ks, vs) in enumerate(parts):
        for head, text in enumerate(pats):
            g = head // (h // hkv)
            qh, kh, vh = qs[:, head : head + 1], ks[:, g : g + 1], vs[:, g : g + 1]
            want, want_lse = sdpa_reference(qh, kh, vh, masks_of(text, qh, kh), scale)
            got = out[head, cu_q[i] : cu_q[i + 1]]
            torch.testing.assert_close(got.float(), want[0, 0], atol=2e-2, rtol=2e-2)
            got_lse = lse[head, cu_q[i] : cu_q[i + 1]]
            torch.testing.assert_close(got_lse, want_lse[0, 0], atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="ends at"):
        wt.attention_varlen(*args, cu_q[:-1] + [cu_q[-1] - 1], cu_k, "causal", layout=layout)
    with pytest.raises(ValueError, match="at least one"):
        wt.attention_varlen(*args, [0, 0] + cu_q[1:], [0, 5] + cu_k[1:], "causal", layout=layout)
    with pytest.raises(ValueError, match="sequences"):
        wt.attention_varlen(*args, cu_q, cu_k[:2] + [cu_k[-1]], "causal", layout=layout)


def test_bad_inputs_raise_value_errors():
    q, k, v = inputs(1, 4, 2, 128, 64, torch.bfloat16, seed=8)
    with pytest.raises(ValueError, match="CUDA tensors"):
        wt.attention(q.cpu(), k, v, "causal")
    with pytest.raises(ValueError, match="bfloat16 or torch.float16"):
        wt.attention(q.float(), k.float(), v.float(), "causal")
    with pytest.raises(ValueError, match="contiguous"):
        wt.attention(q.transpose(1, 2), k, v, "causal")
    with pytest.raises(ValueError, match="divide"):
        wt.attention(q, k[:, :1].expand(1, 3, 128, 64).contiguous(), v[:, :1].expand(1, 3, 128, 64).contiguous(), "causal")
    with pytest.raises(ValueError, match="batch or head_dim"):
        wt.attention(q, k[..., :32].contiguous(), v[..., :32].contiguous(), "causal")
    with pytest.raises(ValueError, match="share a dtype"):
        wt.attention(q, k.half(), v.half(), "causal")
    with pytest.raises(ValueError, match="patterns for 4 query heads"):
        wt.attention(q, k, v, wt.plan("causal", 2))
    with pytest.raises(ValueError, match="windw"):
        wt.attention(q, k, v, "causal & windw(3)")
    with pytest.raises(ValueError, match="positive"):
        wt.attention(q, k, v, "causal", scale=0.0)
    with pytest.raises(ValueError, match="head_dim must be 64, 128 or 256"):
        a = torch.zeros(1, 4, 128, 48, dtype=torch.bfloat16, device="cuda")
        wt.attention(a, a[:, :2].contiguous(), a[:, :2].contiguous(), "causal")
    q.requires_grad_(True)
    out = wt.attention(q, k, v, "causal")
    with pytest.raises(NotImplementedError, match="backward"):
        out.sum().backward()


@pytest.mark.parametrize("host,hot_pages", [(False, 0), (True, 0), (True, 512)])
def test_paged_cache_decodes_over_what_the_cpu_reference_keeps(host, hot_pages):
    dtype, hq, hkv, d, ps = torch.bfloat16, 8, 2, 128, 16
    lens = [3, 700, 1501]
    g = torch.Generator(device="cuda").manual_seed(31)
    ks = [torch.randn(hkv, n, d, generator=g, device="cuda").to(dtype) for n in lens]
    vs = [torch.randn(hkv, n, d, generator=g, device="cuda").to(dtype) for n in lens]
    cache = wt.PagedCache(
        len(lens),
        hq,
        hkv,
        d,
        max_tokens=max(lens) + 8,
        page_size=ps,
        dtype=dtype,
        host=host,
        hot_pages=hot_pages,
        key_bits=4,
    )
    # The first tokens by fill, the last two by appends.
    for b, n in enumerate(lens):
        cache.fill(b, ks[b][:, : n - 2].contiguous(), vs[b][:, : n - 2].contiguous())
    for back in (2, 1):
        cache.append(
            torch.stack([k[:, n - back] for k, n in zip(ks, lens)]), torch.stack([v[:, n - back] for v, n in zip(vs, lens)])
        )
    assert cache.lens == lens
    q = torch.randn(len(lens), hq, d, generator=g, device="cuda").to(dtype)
    quest = f"retrieval(unit = page({ps}), keep = top_k(8), sink = 4, recent = 32)"
    quest_p = f"retrieval(unit = page({ps}), keep = top_p(0.5), sink = 4, recent = 32)"
    paris = f"retrieval(unit = page({ps}), score = quantized(4), keep = top_k(8), sink = 4, recent = 32)"
    shared = f"retrieval(unit = page({ps}), keep = top_k(8), sink = 4, recent = 32, per = kv_head)"
    for text in (None, quest, quest_p, quest, paris, shared):
        out, lse = cache.decode(q, text, return_lse=True)
        for b, n in enumerate(lens):
            qb, kb, vb = q[b][None, :, None], ks[b][None], vs[b][None]
            if text is None:
                mask = torch.ones(1, hq, 1, n, dtype=torch.bool, device="cuda")
            else:
                mask = masks_of(text, qb, kb)
            want, want_lse = sdpa_reference(qb, kb, vb, mask, 1 / math.sqrt(d))
            torch.testing.assert_close(out[b].float(), want[0, :, 0], atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(lse[b], want_lse[0, :, 0], atol=2e-2, rtol=0)
    stats = cache.hot_stats()
    if not host:
        assert stats is None
    elif hot_pages == 0:
        assert stats["lookups"] == 0
    else:
        # The last step repeats the second's choice: its pages were copied then, found now.
        assert stats["copied"] > 0 and stats["hits"] > 0 and 0 < stats["hit_rate"] <= 1, stats
    with pytest.raises(ValueError, match="the cache's pages"):
        cache.decode(q, "retrieval(unit = cluster(32), score = centroid, keep = top_k(4))")
    with pytest.raises(ValueError, match="shape"):
        cache.decode(q[:, :4].contiguous())
    with pytest.raises(ValueError, match="float16"):
        cache.append(ks[0][:, :3].transpose(0, 1).half().contiguous(), vs[0][:, :3].transpose(0, 1).half().contiguous())
