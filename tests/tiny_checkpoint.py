"""A tiny local Hugging Face checkpoint, shared by the tests that load one."""


def save_tiny_gpt_neox(directory, *, vocab_size: int):
    """A one-layer GPT-NeoX (Pythia layout) saved by ``transformers`` as a local checkpoint directory."""
    import transformers

    config = transformers.GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.GPTNeoXForCausalLM(config).save_pretrained(directory)
    return directory
