"""weft: sparse-attention and KV-retrieval kernels compiled and autotuned per GPU.

CPU side, on NumPy arrays (``[heads, tokens, head_dim]``) and safetensors files; the same
answers as the ``weft`` command::

    import weft
    p = weft.Pattern("causal & (sink(64) | local(256) | vertical_vector(keep = top_k(512)))")
    p.hash                                    # the content hash the kernel database keys on
    ix = weft.sparse_index(p, q, k)           # CSR lists of key blocks and key columns
    out, lse = weft.reference_attention(p, q, k, v)
    weft.mask(p, q, k, head=0)                # dense boolean [nq, nk]
    weft.explain(p, q, k)                     # `weft explain --json`
    weft.search("qk.safetensors", target_recall=0.95)   # one pattern per head

GPU side, on torch CUDA tensors: :func:`weft.torch.attention` (``import weft.torch``), and
:func:`weft.hf.apply` for Hugging Face transformers models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from os import PathLike
from typing import Callable, Optional, Sequence, Union

import numpy as np

from ._weft import (  # noqa: F401  (re-exported)
    LayerPlan,
    Pattern,
    SparseIndex,
    WeftError,
    __version__,
)
from . import _weft

PatternLike = Union[Pattern, str]

__all__ = [
    "Pattern",
    "LayerPlan",
    "SparseIndex",
    "WeftError",
    "Choice",
    "pattern",
    "plan",
    "families",
    "builtins",
    "explain",
    "sparse_index",
    "mask",
    "reference_attention",
    "search",
    "load_choices",
    "load_search",
]


def pattern(spec: PatternLike) -> Pattern:
    """A :class:`Pattern` from a Pattern, DSL text, a built-in name or a pattern file."""
    if isinstance(spec, Pattern):
        return spec
    if isinstance(spec, (str, PathLike)):
        return Pattern(str(spec))
    raise TypeError(f"expected a weft.Pattern or pattern text, got {type(spec).__name__}")


def plan(spec: Union[LayerPlan, PatternLike, Sequence[PatternLike]], heads: int) -> LayerPlan:
    """A :class:`LayerPlan` for ``heads`` query heads: one pattern for all, or one per head."""
    if isinstance(spec, LayerPlan):
        p = spec
    elif isinstance(spec, (Pattern, str, PathLike)):
        p = LayerPlan([pattern(spec)] * heads)
    else:
        p = LayerPlan([pattern(s) for s in spec])
    if p.heads != heads:
        raise ValueError(f"the plan has {p.heads} patterns for {heads} query heads; give one per head")
    return p


def families() -> list:
    """Every pattern family: ``[(name, summary, [(param, default, accepted)])]``."""
    return _weft.families()


def builtins() -> dict:
    """The built-in patterns by name, as DSL text."""
    return dict(_weft.builtins())


def _f32(name: str, a) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 3:
        raise ValueError(f"`{name}` must be [heads, tokens, head_dim], got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


def explain(
    p: PatternLike,
    q,
    k,
    *,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    universe: str = "auto",
    recall_rows: int = 256,
) -> dict:
    """The index of ``p`` over ``q`` and ``k`` with its density and recall: the document
    ``weft explain --json`` prints."""
    return json.loads(
        _weft.explain_json(pattern(p), _f32("q", q), _f32("k", k), block_m, block_n, universe, recall_rows)
    )


def sparse_index(
    p: PatternLike,
    q,
    k,
    *,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    scale: Optional[float] = None,
) -> SparseIndex:
    """The sparse index of ``p`` over ``q`` ``[hq, nq, d]`` and ``k`` ``[hkv, nk, d]``."""
    return _weft.sparse_index(pattern(p), _f32("q", q), _f32("k", k), block_m, block_n, scale)


def mask(
    p: PatternLike,
    q=None,
    k=None,
    *,
    head: int = 0,
    nq: Optional[int] = None,
    nk: Optional[int] = None,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
) -> np.ndarray:
    """Head ``head`` of ``p`` as a dense boolean ``[nq, nk]`` mask in token order.

    A static pattern needs only the lengths (``nq``, ``nk``); a dynamic one reads ``q`` and ``k``.
    """
    p = pattern(p)
    if q is None or k is None:
        if not p.is_static:
            raise ValueError(f"pattern {p.name} chooses its pairs from Q and K: pass q and k")
        if nk is None:
            raise ValueError("give nk (and nq, default nk) or q and k")
        nq = nk if nq is None else nq
        q = np.zeros((head + 1, nq, 1), np.float32)
        k = np.zeros((1, nk, 1), np.float32)
    return sparse_index(p, q, k, block_m=block_m, block_n=block_n).dense_mask(head)


def reference_attention(
    p: PatternLike,
    q,
    k,
    v,
    *,
    scale: Optional[float] = None,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
):
    """Exact attention over the pairs ``p`` keeps (f64 accumulation): ``(out [hq, nq, dv]
    float32, lse [hq, nq] float64)``; a row that keeps no key has output 0 and lse -inf."""
    return _weft.reference_attention(
        pattern(p), _f32("q", q), _f32("k", k), _f32("v", v), scale, block_m, block_n
    )


@dataclass(frozen=True)
class Choice:
    """The pattern a search chose for one head: ``density`` is the exact share of the causal
    (or, for a bidirectional search, all) pairs it computes; ``recall`` the estimated share of
    the softmax mass it keeps, with its standard error ``recall_se``."""

    layer: int
    head: int
    family: str
    pattern: Pattern
    density: float
    recall: float
    #: Standard error of ``recall`` (0 when every row was measured).
    recall_se: float = 0.0


def _choices(items: list) -> list:
    return [
        Choice(
            layer=c["layer"],
            head=c["head"],
            family=c["family"],
            pattern=Pattern.from_json(json.dumps(c["pattern"])),
            density=c["density"],
            recall=c["recall"],
            recall_se=c.get("recall_se", 0.0),
        )
        for c in items
    ]


def search(
    qk: Union[str, PathLike],
    *,
    target_recall: float = 0.95,
    budget: Optional[float] = None,
    causal: bool = True,
    cpu: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
) -> list:
    """``weft search`` over a Q/K safetensors file (``tools/capture_qk.py`` writes one):
    for every layer and head, the cheapest candidate reaching ``target_recall``, or with
    ``budget``, the best recall at that mean density. Returns a list of :class:`Choice`;
    nothing is stored (``weft search`` stores in the kernel database)."""
    text, _layers, _cands, _rows, _backend = _weft.search_json(
        str(qk), target_recall, budget, causal, cpu, progress
    )
    return _choices(json.loads(text))


def load_choices(path: Union[str, PathLike]) -> list:
    """The choices ``weft search --json FILE`` wrote."""
    with open(path) as f:
        return _choices(json.load(f))


def load_search(model: str, db: Optional[Union[str, PathLike]] = None) -> list:
    """The choices ``weft search --model MODEL`` stored in the kernel database ``db``
    (default: ``$WEFT_DB``, else the per-user cache directory), in (layer, head) order: what
    :func:`weft.hf.apply` and :func:`plans_from_choices` take. The database is read and
    released at once, so a running search or autotune is not disturbed."""
    return _choices(json.loads(_weft.search_results_json(model, None if db is None else str(db))))


def plans_from_choices(choices: Sequence[Choice]) -> dict:
    """``{layer: LayerPlan}`` from search choices (every head of each layer must be there)."""
    by_layer: dict = {}
    for c in choices:
        by_layer.setdefault(c.layer, {})[c.head] = c.pattern
    plans = {}
    for layer, heads in sorted(by_layer.items()):
        n = len(heads)
        if sorted(heads) != list(range(n)):
            raise ValueError(f"layer {layer}: the choices cover heads {sorted(heads)}, not 0..{n - 1}")
        plans[layer] = LayerPlan([heads[h] for h in range(n)])
    return plans
