"""The package's CPU side against independent NumPy references and the `weft` command.

The command's binary comes from $WEFT_BIN (scripts/test.sh points it at the one the Rust
tests built); tests comparing against it say they skipped when it is not there.
"""

import json
import math
import os
import subprocess

import numpy as np
import pytest

import weft

WEFT_BIN = os.environ.get("WEFT_BIN")
needs_cli = pytest.mark.skipif(
    not (WEFT_BIN and os.path.exists(WEFT_BIN)), reason="no `weft` binary: set WEFT_BIN to compare with the command"
)


def rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def numpy_attention(q, k, v, masks, scale):
    """Masked softmax attention in float64; masks[h] is [nq, nk] boolean."""
    hq, nq, _ = q.shape
    group = hq // k.shape[0]
    out = np.zeros((hq, nq, v.shape[2]))
    lse = np.full((hq, nq), -np.inf)
    for h in range(hq):
        s = scale * (q[h].astype(np.float64) @ k[h // group].astype(np.float64).T)
        s = np.where(masks[h], s, -np.inf)
        m = s.max(axis=1, keepdims=True)
        rows = np.isfinite(m[:, 0])
        p = np.where(masks[h], np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
        z = p.sum(axis=1, keepdims=True)
        out[h, rows] = (p[rows] / z[rows]) @ v[h // group].astype(np.float64)
        lse[h, rows] = m[rows, 0] + np.log(z[rows, 0])
    return out, lse


# --- patterns ---------------------------------------------------------------------------


def test_pattern_text_hash_and_json_round_trip():
    p = weft.Pattern("causal & (sink(64) | local(256))")
    assert p.name == "pattern" and p.is_static and not p.is_retrieval
    assert len(p.hash) == 64 and int(p.hash, 16) >= 0
    again = weft.Pattern.from_json(p.json)
    assert again == p and hash(again) == hash(p)
    # The hash is the canonical form's: equivalent spellings agree, different patterns do not.
    assert weft.Pattern("causal & (local(256) | sink(64))").hash == p.hash
    assert weft.Pattern("causal & (sink(64) | local(128))").hash != p.hash
    assert weft.Pattern("causal", name="decoder").name == "decoder"


def test_pattern_files_and_builtins(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('name = "mine"\npattern = "causal & window(512)"\n')
    p = weft.Pattern(str(f))
    assert p.name == "mine" and p.hash == weft.Pattern("causal & window(512)").hash
    names = weft.builtins()
    assert "vertical-slash" in names
    assert weft.Pattern("vertical-slash").text == names["vertical-slash"]
    fams = [f[0] for f in weft.families()]
    assert "vertical_vector" in fams and "block" in fams


@needs_cli
def test_hash_matches_the_command():
    text = "sink(64) | local(128) | vertical_vector(q_block = 64, keep = top_k(64))"
    out = subprocess.run(
        [WEFT_BIN, "explain", text, "--json", "--seq", "256", "--heads", "2"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["hash"] == weft.Pattern(text).hash


@pytest.mark.parametrize(
    "text, needle",
    [
        ("block(keep = top_k(1.5))", "top_k"),
        ("causal & windw(3)", "windw"),
        ("vertical_vector(q_block = 100)", "q_block"),
    ],
)
def test_bad_patterns_raise_value_error_naming_the_problem(text, needle):
    with pytest.raises(ValueError, match=needle):
        weft.Pattern(text)


def test_unknown_names_and_wrong_types():
    with pytest.raises(ValueError, match="neither a pattern file"):
        weft.Pattern("no_such_pattern")
    with pytest.raises(TypeError):
        weft.pattern(42)
    with pytest.raises(ValueError, match="not a pattern's JSON"):
        weft.Pattern.from_json("{}")


# --- masks and indexes --------------------------------------------------------------------


@pytest.mark.parametrize("nq, nk", [(200, 200), (77, 300)])
def test_static_masks_match_their_predicates(nq, nk):
    q = np.arange(nq)[:, None] + (nk - nq)  # causal patterns align the last query with the last key
    k = np.arange(nk)[None, :]
    cases = {
        "causal": k <= q,
        "causal & window(50)": (k <= q) & (q - k < 50),
        "sink(16) | local(33)": (k < 16) | (np.abs(q - k) < 33),
        "causal & (k < 4 || q / 64 == k / 64)": (k <= q) & ((k < 4) | ((q - (nk - nq)) // 64 == k // 64)),
    }
    for text, want in cases.items():
        got = weft.mask(text, nq=nq, nk=nk)
        assert got.shape == (nq, nk) and got.dtype == bool
        np.testing.assert_array_equal(got, want, err_msg=text)


def test_index_shape_density_and_gqa():
    q, k = rand((4, 300, 32), 1), rand((2, 300, 32), 2)
    p = weft.Pattern("causal & (sink(8) | local(40) | vertical_vector(q_block = 64, keep = top_k(24)))")
    ix = weft.sparse_index(p, q, k)
    assert (ix.heads, ix.nq, ix.nk, ix.block_m) == (4, 300, 300, 64)
    rows = ix.heads * math.ceil(300 / 64)
    assert len(ix.block_ptr) == rows + 1 and len(ix.col_ptr) == rows + 1
    assert ix.block_ptr[-1] == len(ix.block_idx) == len(ix.block_mask)
    assert ix.col_ptr[-1] == len(ix.col_idx) == len(ix.col_mask)
    masks = [ix.dense_mask(h) for h in range(4)]
    assert ix.pairs == [int(m.sum()) for m in masks]
    assert ix.density == pytest.approx(sum(ix.pairs) / (4 * 300 * 300))
    for m in masks:
        causal = np.tril(np.ones((300, 300), bool))
        assert not (m & ~causal).any(), "a causal pattern kept a future key"
        assert m[:, :8][causal[:, :8]].all(), "sink keys dropped"
    with pytest.raises(ValueError, match="out of range"):
        ix.dense_mask(4)


def test_vertical_vector_keeps_the_top_scoring_columns():
    # Every query leans on one direction and key 100 points along it: every query block keeps it.
    q, k = rand((2, 256, 16), 3), rand((2, 256, 16), 4)
    u = np.zeros(16, np.float32)
    u[0] = 1.0
    q += 2.0 * u
    k[:, 100, :] = 5.0 * u
    for h in range(2):
        m = weft.mask("vertical_vector(q_block = 64, keep = top_k(8))", q, k, head=h)
        assert m[:, 100].all()
        assert m.mean() < 0.7  # its default sink and local band, and 8 columns per block


# --- reference attention ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "causal",
        "sink(4) | local(20)",
        "causal & (sink(8) | local(32) | vertical_vector(q_block = 64, keep = top_k(16)))",
        "block(block_q = 32, block_k = 32, keep = top_k(3))",
        "causal & vertical_slash(vertical = top_k(20), slash = top_k(4), block = 32)",
        "causal & window(3) & (k > 5)",  # rows that keep no key
    ],
)
def test_reference_attention_matches_numpy_on_the_patterns_mask(text):
    q, k, v = rand((4, 150, 16), 5), rand((2, 150, 16), 6), rand((2, 150, 24), 7)
    out, lse = weft.reference_attention(text, q, k, v)
    assert out.shape == (4, 150, 24) and lse.shape == (4, 150)
    masks = [weft.mask(text, q, k, head=h) for h in range(4)]
    want, want_lse = numpy_attention(q, k, v, masks, 1 / 4)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-9, atol=1e-9)
    empty = ~np.array(masks).any(axis=2)
    assert (out[empty] == 0).all()


def test_reference_attention_scale_and_bad_inputs():
    q, k, v = rand((2, 40, 8), 8), rand((2, 40, 8), 9), rand((2, 40, 8), 10)
    out, _ = weft.reference_attention("full", q, k, v, scale=0.1)
    want, _ = numpy_attention(q, k, v, [np.ones((40, 40), bool)] * 2, 0.1)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    bad = q.copy()
    bad[1, 3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        weft.reference_attention("full", bad, k, v)
    with pytest.raises(ValueError, match="heads, tokens, head_dim"):
        weft.reference_attention("full", q[0], k, v)
    with pytest.raises(ValueError):
        weft.reference_attention("full", q, rand((3, 40, 8), 1), rand((3, 40, 8), 2))
    with pytest.raises(ValueError, match="positive"):
        weft.reference_attention("full", q, k, v, scale=-1.0)


# --- explain and search -------------------------------------------------------------------


def save_qk(path, layers):
    from safetensors.numpy import save_file

    tensors = {}
    for i, (q, k) in enumerate(layers):
        tensors[f"layers.{i}.q"] = q
        tensors[f"layers.{i}.k"] = k
    save_file(tensors, str(path))


@needs_cli
def test_explain_matches_the_command(tmp_path):
    pytest.importorskip("safetensors")
    q, k = rand((2, 256, 32), 11), rand((2, 256, 32), 12)
    f = tmp_path / "qk.safetensors"
    from safetensors.numpy import save_file

    save_file({"q": q, "k": k}, str(f))
    text = "causal & (sink(16) | vertical_vector(q_block = 64, keep = top_k(32)))"
    cli = subprocess.run([WEFT_BIN, "explain", text, "--json", "--qk", str(f)], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    want = json.loads(cli.stdout)
    got = weft.explain(weft.Pattern(text, name="cli"), q, k)
    for doc in (want, got):
        del doc["build_ms"], doc["input"]
    assert got == want


@needs_cli
def test_search_matches_the_command_and_covers_every_head(tmp_path):
    pytest.importorskip("safetensors")
    f = tmp_path / "model.safetensors"
    layers = [(rand((4, 512, 32), 20 + i), rand((2, 512, 32), 30 + i)) for i in range(2)]
    save_qk(f, layers)
    seen = []
    choices = weft.search(f, target_recall=0.9, cpu=True, progress=lambda done, total: seen.append((done, total)))
    assert [(c.layer, c.head) for c in choices] == [(l, h) for l in range(2) for h in range(4)]
    assert seen and seen[-1][0] == seen[-1][1]
    for c in choices:
        assert isinstance(c.pattern, weft.Pattern)
        assert c.recall >= 0.9 or c.family == "dense"
    out = tmp_path / "choices.json"
    cli = subprocess.run(
        [WEFT_BIN, "search", "--qk", str(f), "--target-recall", "0.9", "--cpu", "--no-db", "--json", str(out)],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr
    assert weft.load_choices(out) == choices
    plans = weft.plans_from_choices(choices)
    assert sorted(plans) == [0, 1] and plans[1].heads == 4


@needs_cli
def test_load_search_reads_what_the_command_stored(tmp_path):
    pytest.importorskip("safetensors")
    f = tmp_path / "model.safetensors"
    save_qk(f, [(rand((4, 300, 32), 40), rand((2, 300, 32), 41))])
    db = tmp_path / "db"
    with pytest.raises(ValueError, match="no search results for model `tiny`"):
        weft.load_search("tiny", db)
    cli = subprocess.run(
        [WEFT_BIN, "search", "--qk", str(f), "--target-recall", "0.9", "--cpu", "--model", "tiny", "--db", str(db),
         "--json", str(tmp_path / "c.json")],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr
    # What the database holds is what the JSON holds (numbers to within JSON's rounding).
    stored, written = weft.load_search("tiny", db), weft.load_choices(tmp_path / "c.json")
    assert [(c.layer, c.head, c.family, c.pattern) for c in stored] == [
        (c.layer, c.head, c.family, c.pattern) for c in written
    ]
    for a, b in zip(stored, written):
        assert (a.density, a.recall, a.recall_se) == pytest.approx((b.density, b.recall, b.recall_se), rel=1e-12)
    assert sorted(weft.plans_from_choices(weft.load_search("tiny", db))) == [0]


def test_search_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="target recall"):
        weft.search(tmp_path / "x.safetensors", target_recall=1.5)
    with pytest.raises(OSError):
        weft.search(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01junk")
    with pytest.raises(ValueError, match="safetensors"):
        weft.search(tmp_path / "junk.safetensors")


def test_plans():
    p = weft.plan("causal", 3)
    assert p.heads == 3 and [x.text for x in p.patterns] == ["causal"] * 3
    assert weft.plan(["causal", "causal & window(8)"], 2).key != weft.plan("causal", 2).key
    with pytest.raises(ValueError, match="3 query heads"):
        weft.plan(["causal"] * 2, 3)
    with pytest.raises(ValueError, match="retrieval"):
        weft.LayerPlan([weft.Pattern("retrieval")])
