"""Tiny random targets, tokenizers and drafters built inside the tests (nothing is downloaded)."""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the a cat dog sat on mat and ran to big small red blue green one two three four five "
         "def return print if else for in list sort python code hello world yes no why how what "
         "hi system user assistant You are tiny be kind").split()
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are tiny.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
    pieces = ["\n", " "] + WORDS + [chr(c) for c in range(33, 127)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + pieces))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|\s|[^\w\s]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    return fast


def save_target(folder: Path, arch: str, seed: int = 0, layers: int = 6, **overrides) -> Path:
    """A random Llama (with llama3 rope scaling, tied) or Qwen3 (q/k norm, untied) target folder."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), bos_token_id=1, pad_token_id=2)
    common.update(overrides)
    if arch == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=True, rope_theta=50000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
        model = LlamaForCausalLM(config)
    elif arch == "qwen3":
        config = Qwen3Config(**common, head_dim=16, tie_word_embeddings=False, rope_theta=1e6)
        model = Qwen3ForCausalLM(config)
    else:
        raise ValueError(arch)
    # Larger weights than the default init: sharper logits make greedy decoding far from ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_random_drafter(folder: Path, target_folder: Path, block_size: int = 16, layers: int = 1,
                        seed: int = 0) -> Path:
    from transformers import AutoConfig

    from dflash_edge.export.drafter import config_for_target, random_drafter, save_drafter

    cfg = AutoConfig.from_pretrained(target_folder)
    mask = 3  # <|mask|> in make_tokenizer
    drafter = random_drafter(config_for_target(cfg, num_layers=layers, block_size=block_size,
                                               mask_token_id=mask), seed=seed, std=0.1)
    save_drafter(drafter, folder, dtype=torch.float32)
    return folder
