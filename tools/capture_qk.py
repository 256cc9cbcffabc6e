#!/usr/bin/env python3
"""Capture Q and K of every attention layer of a Hugging Face transformers model, after the
rotary embedding, for `weft search --qk`.

Writes a safetensors file with `layers.<L>.q` [heads, tokens, head_dim] and `layers.<L>.k`
[kv_heads, tokens, head_dim] (GQA kept as is) for batch element 0, in bf16, f16 or f32.

How: a custom attention function is registered with transformers' AttentionInterface and
selected as the model's attention implementation; transformers calls it with the query and key
states after rotary embedding, it records them, then runs the regular SDPA attention, so the
model's output is unchanged. Needs transformers >= 4.48 (the AttentionInterface) and a model
whose attention uses it (Llama, Mistral, Qwen2/3, Gemma, Phi-3 and most decoder LLMs).

    python3 tools/capture_qk.py --model Qwen/Qwen2.5-0.5B --text-file book.txt --max-tokens 16384 --out qk.safetensors
    python3 tools/capture_qk.py --model ./tiny-llama-config --random-init --max-tokens 512 --out qk.safetensors
"""
import argparse
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model name or local path (config and weights)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--text", help="the text to run")
    src.add_argument("--text-file", help="a file with the text to run")
    ap.add_argument("--max-tokens", type=int, default=16384, help="truncate the input to this many tokens")
    ap.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16", help="dtype of the saved tensors")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--random-init", action="store_true",
                    help="build the model from its config with random weights and feed random tokens "
                         "(for testing the capture without downloading weights)")
    ap.add_argument("--out", required=True, help="the safetensors file to write")
    args = ap.parse_args()

    try:
        import torch
        import transformers
        from safetensors.torch import save_file
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    except ImportError as e:
        print(f"error: {e}; install torch, transformers (>= 4.48) and safetensors", file=sys.stderr)
        return 2

    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            layer = len(captured) // 2
        captured[f"layers.{layer}.q"] = query[0].detach().to(dtype).cpu().contiguous()
        captured[f"layers.{layer}.k"] = key[0].detach().to(dtype).cpu().contiguous()
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("weft_capture", capture)

    if args.random_init:
        config = AutoConfig.from_pretrained(args.model)
        config._attn_implementation = "weft_capture"
        model = AutoModelForCausalLM.from_config(config, attn_implementation="weft_capture")
        torch.manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (1, args.max_tokens))
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype, attn_implementation="weft_capture")
        tok = AutoTokenizer.from_pretrained(args.model)
        if args.text_file:
            text = open(args.text_file, encoding="utf-8").read()
        elif args.text:
            text = args.text
        else:
            print("error: give --text or --text-file (or --random-init)", file=sys.stderr)
            return 2
        ids = tok(text, return_tensors="pt", truncation=True, max_length=args.max_tokens)["input_ids"]
    model.to(device).eval()
    with torch.no_grad():
        model(input_ids=ids.to(device))
    if not captured:
        print(f"error: no attention call went through the capture; {type(model).__name__} may not use "
              f"transformers' AttentionInterface (transformers {transformers.__version__})", file=sys.stderr)
        return 1
    layers = len(captured) // 2
    q0, k0 = captured["layers.0.q"], captured["layers.0.k"]
    save_file(captured, args.out, metadata={"model": args.model, "tokens": str(ids.shape[1])})
    print(f"wrote {args.out}: {layers} layers, q {list(q0.shape)}, k {list(k0.shape)}, {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
