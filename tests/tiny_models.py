"""Tiny randomly initialised causal LMs of any layout, for the tests (and benchmarks/scaling.py).

``tiny_llama`` is the Llama the tests run every LLM model with (the ``tiny_llama_dir`` fixture
saves it with the embedded tokenizer); ``tiny_causal_lm`` builds any transformers
``model_type`` the same way (tests/test_layouts.py).
"""
import torch


def tiny_llama(tokenizer_or_vocab_size, hidden_size=32, layers=2, heads=4, seed=0):
    """A tiny randomly initialised LlamaForCausalLM for tests (:func:`tiny_causal_lm`)."""
    return tiny_causal_lm("llama", tokenizer_or_vocab_size, hidden_size, layers, heads, seed)


def tiny_causal_lm(model_type, tokenizer_or_vocab_size, hidden_size=32, layers=2, heads=4, seed=0):
    """A tiny randomly initialised causal LM of any transformers ``model_type`` (``llama``,
    ``mistral``, ``qwen2``, ``gpt2``, ``gpt_neox``, ``phi``...) for tests, with grouped-query
    attention where the architecture has it (half as many key/value heads).

    Given a tokenizer, the vocabulary size and the pad/eos/bos ids come from it.
    The global torch RNG is left untouched.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(tokenizer_or_vocab_size, int):
        vocab_size, special_token_ids = tokenizer_or_vocab_size, {}
    else:
        tokenizer = tokenizer_or_vocab_size
        vocab_size = len(tokenizer)
        special_token_ids = {
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        }
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2 if heads % 2 == 0 else heads,
        max_position_embeddings=2048,
        **special_token_ids,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)
