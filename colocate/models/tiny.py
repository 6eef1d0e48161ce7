"""A tiny causal LM and its tokenizer, built on the spot so tests and CPU runs need no model hub.

`build_tiny_model` writes a directory that both HF transformers and vLLM load: config.json, model.safetensors,
tokenizer.json and tokenizer_config.json. The tokenizer depends only on the corpus (never on the seed), so
models built with different seeds share it and one can be refit into an engine serving the other.

    python -m colocate.models.tiny OUT_DIR [--seed N] [--arch ARCH] [--tie | --no-tie]

`ARCHS` lists the families: the dense ones the framework refits exactly (Llama, Mistral, Qwen2, Qwen3, Gemma,
Gemma2, Phi-3) and two MoE ones (Qwen3-MoE, Mixtral), each at its own model type's defaults except the sizes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

# `<|endoftext|>` as EOS, as in GPT-2 and Qwen2: transformers 5 loads any qwen2 checkpoint's tokenizer as
# Qwen2Tokenizer, which adds `<|endoftext|>` (its default unk) when the vocabulary lacks it, and the tokenizer
# would then be one token longer than the model's embedding table.
BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"
# vLLM's CPU attention kernels only support head sizes of 32 and above.
MIN_HEAD_DIM = 32
# transformers' models/qwen2/tokenization_qwen2.py: one digit per piece, letters with one leading non-letter.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Enough to name every role without pulling in a real chat format.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# arch -> (HF model type, whether its checkpoints tie embeddings by default, extra config keys). `{head_dim}` and
# `{intermediate}` are filled in from the sizes asked for, `{experts}` from `num_experts`; 2 experts per token.
ARCHS: dict[str, tuple[str, bool, dict]] = {
    "llama": ("llama", False, {}),
    "mistral": ("mistral", False, {"sliding_window": None, "head_dim": "{head_dim}"}),
    "qwen2": ("qwen2", False, {}),
    "qwen3": ("qwen3", False, {"head_dim": "{head_dim}"}),
    "gemma": ("gemma", True, {"head_dim": "{head_dim}", "hidden_activation": "gelu_pytorch_tanh"}),
    "gemma2": ("gemma2", True, {"head_dim": "{head_dim}", "query_pre_attn_scalar": "{head_dim}",
                                "sliding_window": 256, "hidden_activation": "gelu_pytorch_tanh"}),
    "phi3": ("phi3", False, {}),
    "qwen3_moe": ("qwen3_moe", False, {"head_dim": "{head_dim}", "num_experts": "{experts}", "num_experts_per_tok": 2,
                                       "moe_intermediate_size": "{intermediate}", "decoder_sparse_step": 1,
                                       "norm_topk_prob": True}),
    "mixtral": ("mixtral", False, {"num_local_experts": "{experts}", "num_experts_per_tok": 2,
                                   "sliding_window": None}),
}
_WORD_TEXT = (
    "the of and to in is that it for as with was on be by this are or from at an which have not has but "
    "what all were when we there can more if no out so said who will up one about would them then she "
    "many some her make like him into time two look write go see number way could people than first water "
    "been call find long down day did get come made may part question answer correct wrong think step sum "
    "add plus minus equals result total first second third because therefore check again final problem"
)


def default_corpus() -> list[str]:
    """Arithmetic question/answer lines in the format of the later GRPO task, plus some plain words."""
    rng = random.Random(0)  # fixed: the tokenizer must not depend on any model seed
    words = _WORD_TEXT.split()
    lines = [f"Q: {a}+{b}= A: {a + b}" for a in range(100) for b in range(0, 100, 3)]
    lines += [f"Q: {a}-{b}= A: {a - b}" for a in range(0, 100, 2) for b in range(0, 100, 5)]
    for _ in range(400):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + ".")
    return lines


def train_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE of exactly `vocab_size` tokens, with bos/eos/pad special tokens.

    Digits are split one per token (Qwen2's pre-tokenizer does it), so numbers keep a uniform structure for
    arithmetic. If the corpus yields fewer merges than asked for, the vocabulary is padded with reserved
    special tokens: the model's embedding table and the tokenizer then agree on every id, so anything the
    engine samples can be detokenized.
    """
    specials = [BOS, EOS, PAD]
    min_size = len(pre_tokenizers.ByteLevel.alphabet()) + len(specials)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size={vocab_size} is below the byte alphabet plus specials ({min_size})")
    tok = Tokenizer(models.BPE())
    # Exactly Qwen2's normalizer and pre-tokenizer: transformers 5 swaps them in for any qwen2 checkpoint
    # (Qwen2Tokenizer ignores the ones in tokenizer.json), so with these every loader tokenizes alike.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens([AddedToken(f"<|reserved_{i}|>", special=True) for i in range(missing)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE
    )


def _init_weights(model: torch.nn.Module, *, seed: int, std: float) -> None:
    """Draw every tensor from one seeded generator, in name order, independent of HF's own init.

    Biases and norm scales get noise too (HF leaves them at 0 and 1): then two seeds differ in every tensor,
    and a refit that skips any tensor changes the engine's outputs.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
            base = 1.0 if "norm" in name else 0.0
            param.copy_(noise + base)


def build_tiny_model(
    out_dir: str | Path,
    *,
    arch: str = "qwen2",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
    seed: int = 0,
    dtype: str = "float32",
    corpus: list[str] | None = None,
    tie_word_embeddings: bool | None = None,
    num_experts: int = 4,
    init_std: float = 0.1,
) -> Path:
    """Write a randomly initialised `arch` model (a key of `ARCHS`) with its tokenizer into `out_dir`.

    `tie_word_embeddings=None` takes the family's default (tied for Gemma, untied for the others).

    `init_std` is five times the usual 0.02: logits then spread over a few units, so greedy decoding rarely
    meets a near-tie that float rounding could flip between vLLM and HF.
    """
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"need num_kv_heads | num_heads | hidden_size, got {num_kv_heads}, {num_heads}, {hidden_size}"
        )
    head_dim = hidden_size // num_heads
    if head_dim < MIN_HEAD_DIM:
        raise ValueError(f"head_dim={head_dim} (hidden_size/num_heads) must be >= {MIN_HEAD_DIM} (vLLM CPU)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus if corpus is not None else default_corpus(), vocab_size)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: expected one of {sorted(ARCHS)}")
    model_type, tied_default, extra = ARCHS[arch]
    common["tie_word_embeddings"] = tied_default if tie_word_embeddings is None else tie_word_embeddings
    fill = {"{head_dim}": head_dim, "{intermediate}": intermediate_size, "{experts}": num_experts}
    common.update({k: fill.get(v, v) if isinstance(v, str) else v for k, v in extra.items()})
    config = AutoConfig.for_model(model_type, **common)
    model = AutoModelForCausalLM.from_config(config)
    _init_weights(model, seed=seed, std=init_std)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _add_legacy_keys(out)
    return out


def _add_legacy_keys(out: Path) -> None:
    """Also write the keys older transformers (4.x, which vLLM 0.24 may run with) read.

    transformers 5 writes `dtype` and `rope_parameters` and names its tokenizer class `TokenizersBackend`;
    4.x reads `torch_dtype` and `rope_theta` and knows only `PreTrainedTokenizerFast`.
    """
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("torch_dtype", config.get("dtype"))
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok_path = out / "tokenizer_config.json"
    tok_config = json.loads(tok_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", default="qwen2", choices=sorted(ARCHS))
    parser.add_argument("--tie", action=argparse.BooleanOptionalAction, default=None,
                        help="tie input and output embeddings (default: the family's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=256)
    parser.add_argument("--num-experts", type=int, default=4, help="MoE families only")
    args = parser.parse_args()
    print(build_tiny_model(args.out_dir, arch=args.arch, seed=args.seed, dtype=args.dtype,
                           tie_word_embeddings=args.tie, hidden_size=args.hidden_size, num_layers=args.num_layers,
                           num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                           intermediate_size=args.intermediate_size, num_experts=args.num_experts))


if __name__ == "__main__":
    main()
