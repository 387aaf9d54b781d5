#!/usr/bin/env python3
"""Build a tiny random Llama (weights + BPE tokenizer + chat template) for tests and benchmarks.

No model hub is reachable from our machines, so tests cannot download even the smallest real
model. This builds one in about a second: a 2-layer Llama with random weights (head_dim 32,
the smallest the vLLM CPU attention backend accepts), a byte-level BPE tokenizer trained here
on a few paragraphs of text, and a chat template. Its output is gibberish, but deterministic
(fixed seed), which is all the engine, router and frontend tests need.

    python scripts/make_tiny_model.py models/tiny-llama [--hidden-size 64 --layers 2 ...]

Prints the output directory. Re-running into an existing, complete directory is a no-op unless
--force is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Never try a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: A Jinja chat template in the ChatML style (what most instruct models use).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

_CORPUS = """
Paris is the capital and most populous city of France. It is located on the river Seine, in
the north of the country. The city is known for its museums, its architecture and its cafes.
Describe the capital of France. The capital of France is Paris. Berlin is the capital of
Germany; Madrid is the capital of Spain; Rome is the capital of Italy; Lisbon is the capital of
Portugal. A distributed inference system serves large language models on many machines.
Requests travel over a message bus; workers host operators; a router picks a worker for each
request; a frontend speaks the OpenAI protocol. Tokens stream back one at a time.
The quick brown fox jumps over the lazy dog. Once upon a time there was a small model that
learned to speak. It knew only a thousand words, but it used them all with great care.
Hello, world! How are you today? I am fine, thank you. What is the weather like? It is sunny.
One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen.
The engine schedules sequences, allocates key and value cache blocks, and samples tokens.
Prefill computes the prompt; decode produces one token per step. Prefix caching reuses blocks.
"""


def _corpus_lines() -> list[str]:
    base = [ln.strip() for ln in _CORPUS.strip().splitlines() if ln.strip()]
    # Repeat with small variations so the BPE trainer sees enough pairs to fill the vocabulary.
    out = []
    for i in range(20):
        for ln in base:
            out.append(ln if i % 2 == 0 else ln.lower())
            out.append(f"{i} {ln.upper() if i % 5 == 0 else ln}")
    return out


def build_tokenizer(vocab_size: int):
    """Train a byte-level BPE on the corpus above; wrap it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(out_dir: Path, *, vocab_size: int, hidden_size: int, layers: int, heads: int,
                intermediate_size: int, max_position: int, seed: int, dtype: str) -> None:
    """Write config, random weights and tokenizer to out_dir."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(vocab_size)
    real_vocab = len(tokenizer)
    head_dim = hidden_size // heads
    if head_dim < 32 or head_dim % 16:
        raise SystemExit(
            f"head_dim = hidden_size / heads = {head_dim}: vLLM's CPU attention needs 32, 64, 80, 96, 112, 128, ..."
        )
    config = LlamaConfig(
        vocab_size=real_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
        max_position_embeddings=max_position,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype=dtype,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Default init (std 0.02) makes every logit nearly equal; a wider spread gives a model whose
    # greedy choice is robust to float rounding, so "same tokens as the engine" is a sharp test.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.25 if "embed" in name or "lm_head" in name else 0.08)
    model = model.to(getattr(torch, dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    ).save_pretrained(out_dir)
    (out_dir / "tdist_tiny_model.json").write_text(
        json.dumps({"seed": seed, "hidden_size": hidden_size, "layers": layers, "heads": heads, "vocab": real_vocab})
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--vocab-size", type=int, default=1000)
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--intermediate-size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--max-position", type=int, default=2048)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if out_dir holds a model")
    args = ap.parse_args(argv)
    marker = args.out_dir / "tdist_tiny_model.json"
    if marker.exists() and (args.out_dir / "model.safetensors").exists() and not args.force:
        print(args.out_dir)
        return 0
    build_model(
        args.out_dir,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        layers=args.layers,
        heads=args.heads,
        intermediate_size=args.intermediate_size,
        max_position=args.max_position,
        seed=args.seed,
        dtype=args.dtype,
    )
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
