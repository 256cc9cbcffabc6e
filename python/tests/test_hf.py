"""weft.hf on a small Llama-shaped model (random weights, tools/testdata/tiny-llama): prefill
through weft's kernels against the same model whose attention is SDPA with weft's mask for
each head. Skipped, saying why, without torch, transformers or a CUDA device."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the GPU tests need torch with CUDA")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the GPU tests need one", allow_module_level=True)

import weft  # noqa: E402
import weft.hf  # noqa: E402

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "testdata", "tiny-llama")

PLANS = {
    0: ["causal", "causal & window(64)", "causal & (sink(16) | local(128))", "causal & window(300)"],
    1: "causal & (sink(32) | local(64) | vertical_vector(q_block = 64, keep = top_k(64)))",
}


def model():
    cfg = transformers.AutoConfig.from_pretrained(CONFIG)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).to("cuda", torch.bfloat16).eval()


def masked_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA with an explicit boolean mask per head from weft's CPU index over the same values."""
    spec = PLANS[module.layer_idx]
    heads = query.shape[1]
    texts = spec if isinstance(spec, list) else [spec] * heads
    group = heads // key.shape[1]
    masks = []
    for h, text in enumerate(texts):
        qh = query[0, h : h + 1].float().cpu().numpy()
        kh = key[0, h // group : h // group + 1].float().cpu().numpy()
        masks.append(weft.mask(text, qh, kh))
    mask = torch.from_numpy(np.stack(masks))[None].cuda()
    k = key.repeat_interleave(group, 1)
    v = value.repeat_interleave(group, 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@torch.inference_mode()
def test_prefill_through_weft_matches_masked_sdpa():
    ids = torch.randint(0, 1000, (1, 700), generator=torch.Generator().manual_seed(1)).cuda()
    ref = model()
    transformers.AttentionInterface.register("weft-test-masked-sdpa", masked_sdpa)
    ref.config._attn_implementation = "weft-test-masked-sdpa"
    want = ref(ids).logits.float()

    m = weft.hf.apply(model(), PLANS, min_tokens=256)
    got = m(ids).logits.float()
    assert torch.isfinite(got).all()
    # Two layers of bf16 activations: compare the logits loosely, the argmax tightly.
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree > 0.98, agree


@torch.inference_mode()
def test_dense_below_the_threshold_and_decode_on_sdpa():
    ids = torch.randint(0, 1000, (1, 100), generator=torch.Generator().manual_seed(2)).cuda()
    dense = model()
    want = dense(ids).logits.float()
    m = weft.hf.apply(model(), "causal & window(8)", min_tokens=4096)  # never reached: SDPA
    torch.testing.assert_close(m(ids).logits.float(), want, atol=0, rtol=0)
    # generate: a weft prefill, then decode steps on the regular path.
    m2 = weft.hf.apply(model(), "causal", min_tokens=64)
    out = m2.generate(ids, max_new_tokens=5, do_sample=False)
    ref = dense.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == ref.shape


def test_apply_rejects_a_wrong_plan():
    with pytest.raises(ValueError, match="patterns for 4 query heads"):
        weft.hf.apply(model(), {0: ["causal"] * 3})
