"""weft's kernels on torch CUDA tensors.

    import weft.torch
    out = weft.torch.attention(q, k, v, "causal & (sink(64) | local(1024) | vertical_vector(keep = top_k(2048)))")
    out, lse = weft.torch.attention(q, k, v, plan, return_lse=True)

Q is ``[B, H, N, D]``, K and V ``[B, Hkv, Nk, D]`` (GQA: Hkv divides H), contiguous, bf16 or
fp16, on one CUDA device; head dims 64 and 128 (256 where the kernel fits). The kernels read
and write the tensors' memory in place, on torch's current stream, with no host
synchronisation; the output and log-sum-exp are allocated by torch. Tuned kernels load from
the kernel database (``weft autotune``); an untuned pattern is compiled once per process and
stored there.

The op is registered as ``torch.ops.weft.attention`` with a fake implementation, so
``torch.compile`` traces through it, and it can be captured in a CUDA graph once a first call
at the same shapes has compiled its kernels (and, for dynamic patterns, the GPU index plans).
"""

from __future__ import annotations

import math
import os
import threading
from typing import Optional, Sequence, Union

import torch

import weft
from . import _weft

__all__ = ["attention", "attention_varlen", "runtime", "plan", "Plan", "PagedCache"]

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}

_lock = threading.Lock()
_runtimes: dict = {}
# Plans by key: the custom op takes the key (a string, which torch.compile treats as a
# constant) and finds the plan here.
_plans: dict = {}


def runtime(device: Union[int, torch.device, None] = None) -> _weft.Runtime:
    """The weft runtime of a CUDA device (one per process and device), on the kernel database
    of ``$WEFT_DB`` or the per-user cache directory."""
    if device is None:
        index = torch.cuda.current_device()
    elif isinstance(device, torch.device):
        index = device.index if device.index is not None else torch.cuda.current_device()
    else:
        index = int(device)
    with _lock:
        rt = _runtimes.get(index)
        if rt is None:
            # torch creates the device's primary context lazily; weft runs in that context.
            torch.cuda.init()
            with torch.cuda.device(index):
                torch.cuda.current_stream()
            rt = _weft.Runtime(index, os.environ.get("WEFT_DB"))
            _runtimes[index] = rt
    return rt


class Plan:
    """A layer plan registered for the op: pass it to :func:`attention` (inside or outside
    ``torch.compile``; build it outside, since building calls into weft's extension)."""

    __slots__ = ("key", "layer_plan")

    def __init__(self, layer_plan: weft.LayerPlan):
        self.layer_plan = layer_plan
        self.key = "plan:" + layer_plan.key
        with _lock:
            _plans.setdefault(self.key, layer_plan)

    @property
    def heads(self) -> int:
        return self.layer_plan.heads

    def __repr__(self) -> str:
        return f"weft.torch.Plan({self.heads} heads)"


def plan(spec, heads: int) -> Plan:
    """A :class:`Plan` for ``heads`` query heads: one pattern (or its text) for every head, a
    list with one per head, or a :class:`weft.LayerPlan` (see :func:`weft.plans_from_choices`)."""
    return Plan(weft.plan(spec, heads))


def _layer_plan(key: str) -> weft.LayerPlan:
    """The plan of an op's key: registered, or (for "text:{heads}:{pattern}") built now."""
    p = _plans.get(key)
    if p is None:
        kind, heads, text = key.split(":", 2)
        if kind != "text":
            raise ValueError(f"no weft plan is registered under {key!r}; build it with weft.torch.plan")
        p = weft.plan(text, int(heads))
        with _lock:
            _plans.setdefault(key, p)
    return p


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Checks q, k and v; returns q's and k's shapes and the CUDA device index (-1 on meta).

    Every eager call pays for this, and each tensor attribute read costs about 0.1 us: valid
    CUDA inputs pass one chain of tests, each attribute read once; anything else goes to
    :func:`_explain`, which names the problem (or passes meta tensors)."""
    try:
        qs, ks = q.shape, k.shape
        dt = q.dtype
        device = q.get_device()
        if (
            q.is_cuda
            and k.is_cuda
            and v.is_cuda
            and dt in _DTYPES
            and k.dtype is dt
            and v.dtype is dt
            and len(qs) == 4
            and len(ks) == 4
            and v.shape == ks
            and qs[0] == ks[0]
            and qs[3] == ks[3]
            and ks[1] > 0
            and qs[1] % ks[1] == 0
            and qs[0] > 0
            and qs[2] > 0
            and ks[2] > 0
            and qs[3] > 0
            and k.get_device() == device
            and v.get_device() == device
            and q.is_contiguous()
            and k.is_contiguous()
            and v.is_contiguous()
        ):
            return qs, ks, device
    except (AttributeError, TypeError):
        pass
    _explain(q, k, v)
    return q.shape, k.shape, q.get_device()


def _explain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raises the error that names what is wrong with q, k and v (meta tensors pass)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        if not (t.is_cuda or t.is_meta):
            raise ValueError(f"`{name}` is on {t.device}; weft's kernels need CUDA tensors (use .cuda())")
        if t.dtype not in _DTYPES:
            raise ValueError(f"`{name}` is {t.dtype}; weft's kernels take torch.bfloat16 or torch.float16")
        if t.dim() != 4:
            raise ValueError(f"`{name}` must be [batch, heads, tokens, head_dim], got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(
                f"`{name}` is not contiguous (strides {t.stride()}); weft reads [batch, heads, tokens, head_dim] "
                "row-major: pass `.contiguous()` (e.g. after `.transpose(1, 2)`)"
            )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    # Each is on CUDA or meta (above); get_device() is the CUDA index, or -1 for meta.
    if not (q.get_device() == k.get_device() == v.get_device()):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, h, n, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    bk, hkv, nk, dk = k.shape
    if bk != b or dk != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head_dim")
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"{hkv} key/value heads must divide {h} query heads (GQA)")
    if min(b, h, n, nk, d) == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")


# The current stream's raw handle: torch's private accessor skips building a Stream object
# (about a microsecond a call); the public one where it is missing.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(device: int) -> int:
    if _raw_stream is not None:
        return _raw_stream(device)
    return torch.cuda.current_stream(device).cuda_stream


# Per device, float32 buffers that kernels write a log-sum-exp nobody asked for into (the
# kernels always write one): an eager call without `return_lse` then allocates only its
# output. Buffers are never freed, since a CUDA graph captured with one writes it on every
# replay; each new one is at least twice the last, so they hold under twice the largest.
class _ScratchLse:
    """One scratch buffer, with its size and address read once (every call checks them)."""

    __slots__ = ("numel", "ptr", "tensor")

    def __init__(self, tensor: torch.Tensor):
        self.numel, self.ptr, self.tensor = tensor.numel(), tensor.data_ptr(), tensor


_lse_scratch: dict = {}


def _scratch_lse(q: torch.Tensor, numel: int, device: int) -> Optional[int]:
    """The address of a scratch LSE buffer of at least ``numel`` floats on ``device``, or
    None where none may be made now (while a CUDA graph is being captured)."""
    bufs = _lse_scratch.get(device)
    if bufs and bufs[-1].numel >= numel:
        return bufs[-1].ptr
    if torch.cuda.is_current_stream_capturing():
        return None  # memory allocated during capture belongs to the graph's pool
    size = max(numel, 2 * bufs[-1].numel if bufs else 0)
    buf = _ScratchLse(torch.empty(size, dtype=torch.float32, device=q.device))
    _lse_scratch.setdefault(device, []).append(buf)
    return buf.ptr


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: weft.LayerPlan, scale: float, want_lse: bool = True):
    """Allocates the output (and the LSE when wanted, else a scratch buffer takes it) and
    queues the kernels on the current stream."""
    return _launch_checked(q, k, v, p, scale, want_lse, q.shape, k.shape, q.get_device())


def _launch_checked(q, k, v, p: weft.LayerPlan, scale: float, want_lse: bool, qs, ks, device: int):
    """:func:`_launch` with the shapes and device :func:`_check` read."""
    b, h, n, d = qs
    _, hkv, nk, _ = ks
    out = torch.empty_like(q)
    lse = None
    lse_ptr = None if want_lse else _scratch_lse(q, b * h * n, device)
    if lse_ptr is None:
        lse = q.new_empty((b, h, n), dtype=torch.float32)
        lse_ptr = lse.data_ptr()
    rt = _runtimes.get(device) or runtime(device)
    rt.attention(
        p,
        (h, hkv, n, nk, d),
        _DTYPES[q.dtype],
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        out.data_ptr(),
        lse_ptr,
        _stream(device),
        scale,
        False,
        1,
        b,
    )
    return out, lse


@torch.library.custom_op("weft::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan_key: str, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(q, k, v, _layer_plan(plan_key), scale)


@_attention.register_fake
def _attention_fake(q, k, v, plan_key, scale):
    b, h, n, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, n), dtype=torch.float32)


def _no_backward(ctx, grad_out, grad_lse):
    raise NotImplementedError(
        "weft has no backward pass yet: weft.torch.attention is forward-only (use it under torch.no_grad() "
        "or torch.inference_mode())"
    )


_attention.register_autograd(_no_backward)


def _resolve(pattern_or_plan, heads: int):
    """The op's plan key and, when already built, the layer plan."""
    if isinstance(pattern_or_plan, str):
        # Pattern text keys the op directly (a constant for torch.compile); parsed on first use.
        return f"text:{heads}:{pattern_or_plan}", None
    p = pattern_or_plan if isinstance(pattern_or_plan, Plan) else plan(pattern_or_plan, heads)
    if p.heads != heads:
        raise ValueError(f"the plan has {p.heads} patterns for {heads} query heads; give one per head")
    return p.key, p.layer_plan


def _scale(scale: Optional[float], head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    return float(scale)


def _through_op(q, k, v) -> bool:
    """Whether a call goes through the registered op: under torch.compile (which traces it)
    and where autograd records it (its backward says that weft is forward-only). Eager
    inference calls the launch directly: the op dispatcher costs tens of microseconds a call,
    more than the launch itself."""
    return torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern_or_plan: Union[str, "Plan", weft.LayerPlan, weft.Pattern, Sequence],
    *,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Sparse attention of ``q`` ``[B, H, N, D]`` over ``k`` and ``v`` ``[B, Hkv, Nk, D]``.

    ``pattern_or_plan``: pattern text for every head, a :class:`Plan` (:func:`plan`), or what
    :func:`plan` takes (a :class:`weft.Pattern`, a list with one pattern per query head, a
    :class:`weft.LayerPlan` such as :func:`weft.plans_from_choices` gives). Under
    ``torch.compile``, pass text or a :class:`Plan` built outside. ``scale`` defaults to ``1 / sqrt(D)``. Returns the output
    ``[B, H, N, D]`` in q's dtype, and with ``return_lse`` the natural-log log-sum-exp
    ``[B, H, N]`` in float32 (-inf for a row that keeps no key).

    A causal pattern aligns the last query with the last key (``k <= q + Nk - N``).
    """
    qs, ks, device = _check(q, k, v)
    if type(pattern_or_plan) is Plan and pattern_or_plan.layer_plan.heads == qs[1]:
        key, p = pattern_or_plan.key, pattern_or_plan.layer_plan
    else:
        key, p = _resolve(pattern_or_plan, qs[1])
    scale = 1.0 / math.sqrt(qs[3]) if scale is None else _scale(scale, qs[3])
    if _through_op(q, k, v):
        out, lse = torch.ops.weft.attention(q, k, v, key, scale)
    else:
        out, lse = _launch_checked(
            q, k, v, p if p is not None else _layer_plan(key), scale, return_lse, qs, ks, device
        )
    return (out, lse) if return_lse else out


def _offsets(name: str, cu, total: int) -> list:
    """``cu_seqlens`` as a list of ints, checked: from 0, non-decreasing, ending at ``total``."""
    if isinstance(cu, torch.Tensor):
        if cu.dim() != 1 or cu.dtype.is_floating_point or cu.dtype == torch.bool:
            raise ValueError(f"`{name}` must be a 1-D integer tensor, got {cu.dtype} {tuple(cu.shape)}")
        cu = cu.tolist()  # a CUDA tensor is read back here: one host synchronisation
    cu = [int(x) for x in cu]
    if len(cu) < 2 or cu[0] != 0:
        raise ValueError(f"`{name}` must hold batch + 1 offsets starting at 0, got {cu[:8]}")
    if any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"`{name}` must not decrease, got {cu[:8]}...")
    if cu[-1] != total:
        raise ValueError(f"`{name}` ends at {cu[-1]}, but the packed tensor holds {total} tokens")
    return cu


@torch.library.custom_op("weft::attention_varlen", mutates_args=())
def _attention_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: list[int], plan_key: str, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_varlen(q, k, v, seqs, _layer_plan(plan_key), scale)


@_attention_varlen.register_fake
def _attention_varlen_fake(q, k, v, seqs, plan_key, scale):
    h, n, _ = q.shape
    return torch.empty_like(q), q.new_empty((h, n), dtype=torch.float32)


_attention_varlen.register_autograd(_no_backward)


def _launch_varlen(q, k, v, seqs: list, p: weft.LayerPlan, scale: float):
    """Head-major packed tensors; ``seqs`` is (nq, nk) per sequence, flattened."""
    h, n, d = q.shape
    hkv = k.shape[0]
    out = torch.empty_like(q)
    lse = q.new_empty((h, n), dtype=torch.float32)
    device = q.get_device()
    rt = _runtimes.get(device) or runtime(device)
    pairs = list(zip(seqs[0::2], seqs[1::2]))
    ptrs = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr())
    rt.attention_varlen(p, (h, hkv), d, pairs, _DTYPES[q.dtype], *ptrs, _stream(device), scale)
    return out, lse


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q,
    cu_seqlens_k,
    pattern_or_plan: Union[str, "Plan", weft.LayerPlan, weft.Pattern, Sequence],
    *,
    scale: Optional[float] = None,
    return_lse: bool = False,
    layout: str = "thd",
):
    """Sparse attention over a packed batch of sequences of different lengths.

    ``layout="thd"`` (flash-attn's and vLLM's): q ``[total_q, H, D]``, k and v
    ``[total_k, Hkv, D]``; weft's kernels read heads outermost, so q, k and v are transposed
    into that layout (one copy each) and the output back. ``layout="htd"``: q ``[H, total_q,
    D]``, k and v ``[Hkv, total_k, D]``, read and written in place (no copy).

    ``cu_seqlens_q`` / ``cu_seqlens_k``: the ``batch + 1`` token offsets of the sequences,
    from 0 (a list or an integer tensor; a CUDA tensor is read back, which waits for the
    device). Every sequence needs at least one query and one key. Each sequence's pattern is
    evaluated at its own lengths: a causal pattern aligns its last query with its last key.

    Returns the output in q's layout and dtype, and with ``return_lse`` the log-sum-exp
    ``[H, total_q]`` in float32.
    """
    if layout not in ("thd", "htd"):
        raise ValueError(f'layout must be "thd" ([tokens, heads, dim]) or "htd" ([heads, tokens, dim]), got {layout!r}')
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"`{name}` must be a 3-D tensor ({layout}), got {getattr(t, 'shape', type(t).__name__)}")
    if layout == "thd":
        q, k, v = (t.transpose(0, 1).contiguous() for t in (q, k, v))
    # [H, N, D] is [1, H, N, D] for the checks.
    _check(q[None], k[None], v[None])
    h, total_q, d = q.shape
    cu_q = _offsets("cu_seqlens_q", cu_seqlens_q, total_q)
    cu_k = _offsets("cu_seqlens_k", cu_seqlens_k, k.shape[1])
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q has {len(cu_q) - 1} sequences and cu_seqlens_k {len(cu_k) - 1}")
    seqs = []
    for b in range(len(cu_q) - 1):
        nq, nk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        if nq == 0 or nk == 0:
            raise ValueError(f"sequence {b} has {nq} queries and {nk} keys; every sequence needs at least one of each")
        seqs += [nq, nk]
    key, p = _resolve(pattern_or_plan, h)
    scale = _scale(scale, d)
    if _through_op(q, k, v):
        out, lse = torch.ops.weft.attention_varlen(q, k, v, seqs, key, scale)
    else:
        out, lse = _launch_varlen(q, k, v, seqs, p if p is not None else _layer_plan(key), scale)
    if layout == "thd":
        out = out.transpose(0, 1).contiguous()
    return (out, lse) if return_lse else out


class PagedCache:
    """A paged KV cache on a CUDA device for decoding a batch of sequences with weft's
    kernels: dense, or with pages chosen on the device (no host synchronisation).

        cache = weft.torch.PagedCache(batch=4, heads=32, kv_heads=8, head_dim=128, max_tokens=32768)
        cache.fill(0, k, v)             # sequence 0's prompt: k, v [kv_heads, n, head_dim]
        cache.append(k_new, v_new)      # one token per sequence: [batch, kv_heads, head_dim]
        out = cache.decode(q, "retrieval(unit = page(16), keep = top_k(64))")  # q [batch, heads, head_dim]

    Pages of ``page_size`` tokens, ``[pages, page_size, kv_heads, head_dim]`` (vLLM's layout),
    each sequence ``ceil(max_tokens / page_size)`` of its own, allocated when the cache is made.
    With ``host=True`` K and V live in pinned host memory (contexts larger than the GPU's
    memory), read over the bus, and the pages retrieval keeps are cached on the GPU in
    ``hot_pages`` slots of one page of one KV head each (:meth:`hot_stats` gives the hit rate);
    the metadata, page table and lengths stay on the GPU. With ``key_bits`` (1, 2, 4 or 8) every
    key is also kept quantized on the GPU, for retrieval by ``score = quantized(key_bits)``.
    The retrieval must use the cache's pages (``unit = page(page_size)``), Quest's ``min_max``
    score or ``quantized(key_bits)`` (ParisKV: a page scores its best token), and any budget
    (``top_k``, ``top_p``, ``threshold``); it keeps exactly the tokens weft's CPU reference
    keeps. A sequence's last query sees all its tokens.
    """

    def __init__(
        self,
        batch: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        max_tokens: int,
        *,
        page_size: int = 16,
        dtype: torch.dtype = torch.bfloat16,
        device: Union[int, torch.device, None] = None,
        host: bool = False,
        hot_pages: int = 0,
        key_bits: int = 0,
    ):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
        if page_size <= 0 or max_tokens <= 0:
            raise ValueError(f"page_size and max_tokens must be positive, got {page_size} and {max_tokens}")
        if hot_pages < 0 or (hot_pages and not host):
            raise ValueError(f"hot_pages ({hot_pages}) are a number of GPU slots for a cache in host memory (host=True)")
        self._rt = runtime(device)
        self.device = torch.device("cuda", self._rt.device)
        self.dtype, self.batch, self.heads, self.kv_heads, self.head_dim = dtype, batch, heads, kv_heads, head_dim
        self.page_size = page_size
        pages = -(-max_tokens // page_size)
        self.host = host
        self._cache = self._rt.paged_cache(
            batch,
            heads,
            kv_heads,
            head_dim,
            page_size,
            pages,
            _DTYPES[dtype],
            host=host,
            hot_pages=hot_pages,
            key_bits=key_bits,
        )

    @property
    def lens(self) -> list:
        """The sequences' lengths."""
        return self._cache.lens

    def _tensor(self, name: str, t: torch.Tensor, shape: tuple) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.device != self.device:
            raise ValueError(f"`{name}` is on {t.device}; the cache is on {self.device}")
        if t.dtype != self.dtype:
            raise ValueError(f"`{name}` is {t.dtype}; the cache holds {self.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"`{name}` must have shape {shape}, got {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"`{name}` is not contiguous (strides {t.stride()}): pass `.contiguous()`")
        return t

    def fill(self, seq: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes sequence ``seq``'s first tokens (``k``, ``v``: ``[kv_heads, n, head_dim]``),
        replacing what it held."""
        if not 0 <= seq < self.batch:
            raise ValueError(f"sequence {seq} of a cache of {self.batch}")
        n = k.shape[1] if isinstance(k, torch.Tensor) and k.dim() == 3 else -1
        shape = (self.kv_heads, n, self.head_dim)
        k, v = self._tensor("k", k, shape), self._tensor("v", v, shape)
        self._rt.paged_fill(self._cache, seq, k.data_ptr(), v.data_ptr(), n, _stream(self._rt.device))

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Appends one token to every sequence: ``k``, ``v`` ``[batch, kv_heads, head_dim]``."""
        shape = (self.batch, self.kv_heads, self.head_dim)
        k, v = self._tensor("k", k, shape), self._tensor("v", v, shape)
        self._rt.paged_append(self._cache, k.data_ptr(), v.data_ptr(), _stream(self._rt.device))

    def decode(
        self,
        q: torch.Tensor,
        retrieval=None,
        *,
        scale: Optional[float] = None,
        return_lse: bool = False,
        splits: int = 0,
    ):
        """One decode step: ``q`` ``[batch, heads, head_dim]`` over each sequence's cache.
        ``retrieval``: a ``retrieval(...)`` pattern (text or :class:`weft.Pattern`), or None
        for every token. Returns the output ``[batch, heads, head_dim]`` and, with
        ``return_lse``, the log-sum-exp ``[batch, heads]`` (float32)."""
        q = self._tensor("q", q, (self.batch, self.heads, self.head_dim))
        pattern = None
        if retrieval is not None:
            pattern = retrieval if isinstance(retrieval, weft.Pattern) else weft.Pattern(retrieval)
        scale = _scale(scale, self.head_dim)
        out = torch.empty_like(q)
        lse = torch.empty((self.batch, self.heads), dtype=torch.float32, device=self.device)
        self._rt.paged_decode(
            self._cache, q.data_ptr(), out.data_ptr(), lse.data_ptr(), _stream(self._rt.device), scale, pattern, splits
        )
        return (out, lse) if return_lse else out

    def hot_stats(self):
        """For a cache in host memory, the hot pages' counters since it was made (waits for the
        GPU): ``lookups`` (a query head's kept page), ``hits`` (found on the GPU), ``copied``
        (pages brought over the bus), ``conflicts`` (read over the bus: another page held the
        slot) and ``hit_rate``. None for a cache in GPU memory."""
        return self._rt.paged_hot_stats(self._cache, _stream(self._rt.device))
