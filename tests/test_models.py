"""jaxrm.models: the GPT-NeoX architecture against Hugging Face, checkpoints, and sharding."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals
from safetensors.numpy import save_file

from jaxrm.models import CausalLM, KVCache, RewardModel, TransformerConfig, preset
from jaxrm.models import transformer as transformer_module
from jaxrm.models.checkpoint import load_model, read_metadata, save_model
from jaxrm.models.hf import load_hf, read_safetensors
from jaxrm.models.sampling import sample
from jaxrm.sharding import make_mesh, param_shardings, shard_batch, shard_model
from jaxrm.train.sft import SFTConfig, sequence_nll, train_sft

# Rows: no padding, left padding, right padding, padding on both sides.
TOKENS = np.array([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14], [15, 16, 17, 0, 0, 0], [0, 18, 19, 20, 21, 0]])
MASK = TOKENS > 0


def _hf_config(**changes):
    values = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        rotary_pct=0.5,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    values.update(changes)
    return transformers.GPTNeoXConfig(**values)


def _randomize(model):
    # HF zero-initialises biases and sets LayerNorms to identity; random values test their mapping too.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=[True, False], ids=["parallel-residual", "sequential-residual"])
def hf_causal_lm(request, tmp_path_factory):
    torch.manual_seed(0)
    model = _randomize(transformers.GPTNeoXForCausalLM(_hf_config(use_parallel_residual=request.param)))
    directory = tmp_path_factory.mktemp("hf_lm")
    model.save_pretrained(directory)
    return model, directory


def _hf_forward(model, tokens, mask):
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    with torch.no_grad():
        out = model(
            torch.tensor(tokens),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(positions),
        )
    return out.logits.numpy()


def test_load_hf_matches_transformers_logits_on_padded_batches(hf_causal_lm):
    hf_model, directory = hf_causal_lm
    model = load_hf(directory)
    assert model.config.rotary_dim == 4 and model.config.parallel_residual == hf_model.config.use_parallel_residual
    ours = np.asarray(model(jnp.asarray(TOKENS), jnp.asarray(MASK)))
    reference = _hf_forward(hf_model, TOKENS, MASK)
    np.testing.assert_allclose(ours[MASK], reference[MASK], atol=1e-4, rtol=0)
    # Real tokens do not see padding: a left-padded row equals the same tokens unpadded.
    unpadded = np.asarray(model(jnp.asarray(TOKENS[1:2, 2:])))
    np.testing.assert_allclose(ours[1, 2:], unpadded[0], atol=1e-5)


def test_reward_model_matches_sequence_classification(tmp_path):
    torch.manual_seed(0)
    hf_model = _randomize(transformers.GPTNeoXForSequenceClassification(_hf_config(num_labels=1)))
    hf_model.save_pretrained(tmp_path)
    model = load_hf(tmp_path, head="reward")
    with torch.no_grad():
        # Right-padded rows only: HF locates the last token through pad ids and ignores the mask.
        rows = TOKENS[[0, 2]]
        reference = hf_model(torch.tensor(rows), attention_mask=torch.tensor((rows > 0).astype(np.int64))).logits
    ours = model(jnp.asarray(rows), jnp.asarray(rows > 0))
    np.testing.assert_allclose(np.asarray(ours), reference.numpy()[:, 0], atol=1e-4)


def test_reward_head_from_a_causal_lm_starts_at_zero(hf_causal_lm):
    _, directory = hf_causal_lm
    model = load_hf(directory, head="reward")
    assert np.all(np.asarray(model(jnp.asarray(TOKENS), jnp.asarray(MASK))) == 0.0)


def test_load_hf_refuses_pickles_and_bad_directories(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickle"):
        load_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_hf(tmp_path / "missing")
    with pytest.raises(ValueError, match="GPT-NeoX"):
        TransformerConfig.from_hf({"model_type": "llama"})


def test_load_hf_reports_missing_and_misshapen_tensors(hf_causal_lm, tmp_path):
    _, directory = hf_causal_lm
    tensors = {k: np.array(v) for k, v in read_safetensors(next(directory.glob("*.safetensors"))).items()}
    config = json.loads((directory / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in tensors.items() if k != "embed_out.weight"}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensors.*embed_out.weight"):
        load_hf(tmp_path)
    config["hidden_size"] = 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match"):
        load_hf(tmp_path)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        preset("tiny", num_heads=5)
    with pytest.raises(ValueError, match="activation"):
        preset("tiny", activation="swish")
    with pytest.raises(ValueError, match="unknown preset"):
        preset("pythia-7b")
    with pytest.raises(ValueError, match="unknown TransformerConfig field"):
        TransformerConfig.from_dict({**preset("tiny").to_dict(), "heads": 4})


@pytest.fixture(scope="module")
def tiny_lm():
    return CausalLM(preset("tiny"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp+tensor"])
def test_sharded_forward_on_4_devices_matches_1_device(tiny_lm, strategy):
    tokens = jnp.asarray(np.tile(TOKENS, (2, 1)))
    mask = tokens > 0
    reference = np.asarray(tiny_lm(tokens, mask))
    mesh = make_mesh(data=2, model=2) if "tensor" in strategy else make_mesh()
    model = nnx.clone(tiny_lm)
    shard_model(model, mesh, strategy=strategy)
    kernel = model.trunk.layers[0].mlp.dense_h_to_4h.kernel[...]
    assert len(kernel.sharding.device_set) == 4
    assert kernel.addressable_shards[0].data.size < kernel.size  # really split, not replicated
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, m))(
        state, shard_batch(tokens, mesh), shard_batch(mask, mesh)
    )
    np.testing.assert_allclose(np.asarray(logits), reference, atol=2e-5)


def test_param_shardings_fall_back_to_replicated_when_not_divisible():
    model = CausalLM(preset("tiny"), rngs=nnx.Rngs(0))  # vocab 97 divides by no mesh axis
    shardings = param_shardings(nnx.state(model), make_mesh(data=1, model=4), strategy="tensor")
    assert tuple(shardings["trunk"]["embed_in"]["embedding"].get_value().spec) == (None, None)
    assert tuple(shardings["trunk"]["layers"][0]["mlp"]["dense_h_to_4h"]["kernel"].get_value().spec) == (None, "model")
    with pytest.raises(ValueError, match="strategy"):
        param_shardings(nnx.state(model), make_mesh(), strategy="zero")
    # Each layer kernel by its axes' roles (embed -> data under fsdp; heads and mlp -> model under tensor).
    expected = {
        "fsdp": {"qkv": ("data", None), "dense": (None, "data"), "up": ("data", None), "down": (None, "data")},
        "tensor": {"qkv": (None, "model"), "dense": ("model", None), "up": (None, "model"), "down": ("model", None)},
        "fsdp+tensor": {
            "qkv": ("data", "model"),
            "dense": ("model", "data"),
            "up": ("data", "model"),
            "down": ("model", "data"),
        },
    }
    for strategy, specs in expected.items():
        layer = param_shardings(nnx.state(model), make_mesh(data=2, model=2), strategy=strategy)["trunk"]["layers"][0]
        kernels = {
            "qkv": layer["attention"]["query_key_value"],
            "dense": layer["attention"]["dense"],
            "up": layer["mlp"]["dense_h_to_4h"],
            "down": layer["mlp"]["dense_4h_to_h"],
        }
        assert {name: tuple(k["kernel"].get_value().spec) for name, k in kernels.items()} == specs, strategy


def test_checkpoint_round_trip_is_exact_and_never_overwrites(tiny_lm, tmp_path):
    reward = RewardModel(preset("tiny"), rngs=nnx.Rngs(3))
    for model, name in ((tiny_lm, "lm"), (reward, "rm")):
        path = save_model(model, tmp_path / name, metadata={"step": 7})
        restored = load_model(path)
        assert type(restored) is type(model) and read_metadata(path) == {"step": 7}
        for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(restored))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileExistsError):
        save_model(tiny_lm, tmp_path / "lm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm", "rm"]  # no staging directories left
    # Saved from 4 devices, it loads onto the default device unless told where.
    sharded = shard_model(CausalLM(preset("tiny"), rngs=nnx.Rngs(0)), make_mesh(), strategy="fsdp")
    path = save_model(sharded, tmp_path / "sharded")
    restored = load_model(path)
    assert {leaf.sharding for leaf in jax.tree.leaves(nnx.state(restored))} == {
        jax.sharding.SingleDeviceSharding(jax.devices()[0])
    }
    # Uncommitted, as a fresh model's arrays are: a program compiled for one serves the other.
    assert not any(leaf.committed for leaf in jax.tree.leaves(nnx.state(restored)))
    logits = jax.jit(lambda params, tokens: nnx.merge(nnx.graphdef(tiny_lm), params)(tokens))
    for model in (tiny_lm, load_model(tmp_path / "lm")):
        logits(nnx.state(model), jnp.ones((1, 3), jnp.int32))
    assert logits._cache_size() == 1
    for a, b in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(restored))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints_load_exactly(hf_causal_lm, tmp_path, dtype):
    hf_model, directory = hf_causal_lm
    half = transformers.GPTNeoXForCausalLM(hf_model.config).to(getattr(torch, dtype))
    half.load_state_dict(hf_model.state_dict())
    half.save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    kernel = np.asarray(model.trunk.layers[1].attention.query_key_value.kernel[...])
    weight = hf_model.gpt_neox.layers[1].attention.query_key_value.weight.detach().to(getattr(torch, dtype)).float()
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel, weight.numpy().T)
    assert load_hf(tmp_path, param_dtype="bfloat16").embed_out.kernel[...].dtype == jnp.bfloat16


def _reference_attention(query, keys, values, visible):
    """Causal softmax attention written out: [batch, time, heads, dim] queries over [batch, slots, ...]."""
    scores = np.einsum("bthd,bshd->bhts", query, keys) / np.sqrt(query.shape[-1])
    scores = np.where(visible[:, None], scores, -1e30)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", weights, values)


def test_dot_product_attention_equals_explicit_softmax_attention(tiny_lm):
    attention = tiny_lm.trunk.layers[0].attention
    config = tiny_lm.config
    x = jax.random.normal(jax.random.key(0), (4, 6, config.hidden_size))
    mask = jnp.asarray(MASK) | (jnp.arange(6) == 5)  # every row has a real token to attend to
    positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
    slots = jnp.arange(6)
    visible = mask[:, None, :] & (slots[None, None, :] <= slots[None, :, None])
    out, _ = attention(x, positions=positions, visible=visible)
    qkv = attention.query_key_value(x).reshape(4, 6, config.num_heads, 3 * config.head_dim)
    query, key, value = (np.asarray(a) for a in jnp.split(qkv, 3, axis=-1))
    query, key = (np.asarray(transformer_module._rotate(jnp.asarray(a), positions, config)) for a in (query, key))
    expected = _reference_attention(query, key, value, np.asarray(visible))
    expected = attention.dense(jnp.asarray(expected.reshape(4, 6, -1)))
    np.testing.assert_allclose(np.asarray(out)[np.asarray(mask)], np.asarray(expected)[np.asarray(mask)], atol=1e-6)


def test_the_vocabulary_major_unembedding_gives_the_same_logits(tiny_lm):
    hidden = jax.random.normal(jax.random.key(0), (3, 2, tiny_lm.config.hidden_size))
    # Taken by the sampler with float32 compute on CPU only (XLA CPU has no bfloat16 kernel for it).
    assert tiny_lm.decodes_vocabulary_major()
    assert not CausalLM(preset("tiny", dtype="bfloat16"), rngs=nnx.Rngs(0)).decodes_vocabulary_major()
    by_vocab = tiny_lm.kernel_by_vocab()
    assert by_vocab.shape == (tiny_lm.config.vocab_size, tiny_lm.config.hidden_size)
    logits = tiny_lm.head(hidden, kernel_by_vocab=by_vocab)
    assert logits.shape == (3, 2, tiny_lm.config.vocab_size) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, tiny_lm.head(hidden), rtol=1e-5, atol=1e-6)
    # The kernel given is the one used (a head that ignored it would pass the line above).
    other = jax.random.normal(jax.random.key(1), by_vocab.shape)
    np.testing.assert_allclose(tiny_lm.head(hidden, kernel_by_vocab=other), hidden @ other.T, rtol=1e-5, atol=1e-5)


def test_scanned_unrolled_and_rematerialised_layers_compute_the_same_function(tiny_lm):
    tokens, mask = jnp.asarray(TOKENS), jnp.asarray(MASK)
    loss_mask = mask.at[:, :2].set(False)

    def logits_and_grads(model):
        graphdef, state = nnx.split(model)
        loss = lambda s: sequence_nll(nnx.merge(graphdef, s), tokens, mask, loss_mask)  # noqa: E731
        logits, grads = jax.jit(lambda s: (nnx.merge(graphdef, s)(tokens, mask), jax.grad(loss)(s)))(state)
        return np.asarray(logits), np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])

    assert tiny_lm.config.scan_layers and not tiny_lm.config.remat
    reference = logits_and_grads(tiny_lm)
    for changes in (dict(scan_layers=False), dict(remat=True)):
        model = CausalLM(preset("tiny", **changes), rngs=nnx.Rngs(0))
        nnx.update(model, nnx.state(tiny_lm))
        for ours, theirs in zip(logits_and_grads(model), reference):
            np.testing.assert_allclose(ours, theirs, atol=2e-6, err_msg=str(changes))
    # remat really rematerialises: its backward pass runs again the 4 forward products whose
    # outputs the gradient reads (the query/key/value projection, attention's two products, the
    # MLP's first projection); the default scanned block keeps those outputs instead.
    assert _count_matmuls(preset("tiny", remat=True)) - _count_matmuls(preset("tiny")) == 4
    unrolled = CausalLM(preset("tiny", scan_layers=False), rngs=nnx.Rngs(0))
    nnx.update(unrolled, nnx.state(tiny_lm))
    prompts = jnp.asarray(TOKENS[:2]), jnp.asarray(MASK[:2])
    scanned_samples = sample(tiny_lm, *prompts, jax.random.key(0), max_new_tokens=4, temperature=0.0)
    unrolled_samples = sample(unrolled, *prompts, jax.random.key(0), max_new_tokens=4, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(scanned_samples.tokens), np.asarray(unrolled_samples.tokens))
    np.testing.assert_allclose(scanned_samples.log_probs, unrolled_samples.log_probs, atol=2e-6)
    # Unrolled layers keep one cache array per layer (attention reads it without a copy).
    scanned_cache, unrolled_cache = (KVCache.empty(m.config, 2, 5).grow(7) for m in (tiny_lm, unrolled))
    assert scanned_cache.keys.shape[:1] + scanned_cache.keys.shape[3:4] == (tiny_lm.config.num_layers, 7)
    assert isinstance(unrolled_cache.values, tuple) and len(unrolled_cache.values) == tiny_lm.config.num_layers
    assert all(layer.shape == scanned_cache.values.shape[1:] for layer in unrolled_cache.values)


def test_scanned_layers_keep_only_their_input_and_matrix_products_for_the_backward_pass(capsys):
    model = CausalLM(preset("tiny", num_layers=3), rngs=nnx.Rngs(0))  # 3: no other axis has that size
    graphdef, state = nnx.split(model)
    tokens = jnp.ones((2, 8), jnp.int32)
    print_saved_residuals(lambda s: sequence_nll(nnx.merge(graphdef, s), tokens, tokens > 0, tokens > 0), state)
    stacked = [line for line in capsys.readouterr().out.splitlines() if "output of scan" in line]
    # Per layer: the block's input, the query/key/value projection, attention's two products and
    # the MLP's first projection; LayerNorm, GELU and softmax are recomputed from them.
    assert len(stacked) == 5, stacked
    assert all(line.split()[0].startswith(f"f32[{model.config.num_layers},") for line in stacked)


def _count_matmuls(config) -> int:
    model = CausalLM(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.ones((2, 8), jnp.int32)
    loss = lambda s: sequence_nll(nnx.merge(graphdef, s), tokens, tokens > 0, tokens > 0)  # noqa: E731
    return jax.jit(jax.grad(loss)).lower(state).as_text().count("dot_general")


def test_a_scanned_program_does_not_grow_with_depth():
    shallow, deep = (_count_matmuls(preset("tiny", num_layers=n)) for n in (2, 8))
    assert shallow == deep
    # Unrolled, each of the 6 extra layers adds its 18 forward and backward matmuls.
    unrolled_shallow, unrolled_deep = (_count_matmuls(preset("tiny", num_layers=n, scan_layers=False)) for n in (2, 8))
    assert unrolled_deep - unrolled_shallow == 6 * 18


def test_bfloat16_compute_with_float32_masters_tracks_float32_training():
    """Mixed precision (bf16 matmuls, f32 parameters and Adam state) against f32, same start.

    Stated tolerances: gradients at the start within 5% relative L2 error (cosine > 0.999); the
    loss of each of 8 Adam steps within 0.02 nats (about 0.5%).
    """
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 97, (64, 12)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    loss_mask = mask & (np.arange(12) >= 6)
    full = CausalLM(preset("tiny"), rngs=nnx.Rngs(0))
    mixed = CausalLM(preset("tiny", dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(mixed, nnx.state(full))

    def flat_grads(model):
        graphdef, state = nnx.split(model)
        data = tuple(jnp.asarray(a) for a in (tokens, mask, loss_mask))
        grads = jax.jit(jax.grad(lambda s: sequence_nll(nnx.merge(graphdef, s), *data)))(state)
        assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
        return np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])

    exact, rounded = flat_grads(full), flat_grads(mixed)
    assert np.linalg.norm(rounded - exact) / np.linalg.norm(exact) < 0.05
    assert rounded @ exact / np.linalg.norm(rounded) / np.linalg.norm(exact) > 0.999
    config = SFTConfig(batch_size=16, epochs=2, learning_rate=1e-2)
    full_losses = train_sft(full, tokens, mask, loss_mask, config, log=None)
    mixed_losses = train_sft(mixed, tokens, mask, loss_mask, config, log=None)
    assert np.max(np.abs(full_losses - mixed_losses)) < 0.02
    assert full_losses[-1] < full_losses[0] and mixed_losses[-1] < mixed_losses[0]
    assert {p.dtype for p in jax.tree.leaves(nnx.state(mixed))} == {jnp.dtype(jnp.float32)}
    assert not np.array_equal(full_losses, mixed_losses)  # the bf16 path really ran in bf16
    # A reward model's score accumulates in float32 too: its rewards are not rounded to bfloat16.
    reward_model = RewardModel(preset("tiny", dtype="bfloat16"), rngs=nnx.Rngs(0))
    reward_model.score.kernel[...] = jax.random.normal(jax.random.key(1), reward_model.score.kernel.shape, jnp.float32)
    rewards = np.asarray(reward_model(jnp.asarray(tokens[:8])))
    assert rewards.dtype == np.float32 and np.all(rewards != rewards.astype(jnp.bfloat16).astype(np.float32))


def test_attention_implementation_is_checked_and_auto_falls_back_to_xla_off_cuda():
    with pytest.raises(ValueError, match="attention_implementation='cudnn' needs a 16-bit dtype"):
        preset("tiny", attention_implementation="cudnn")
    with pytest.raises(ValueError, match="attention_implementation='flash'"):
        preset("tiny", attention_implementation="flash")
    for dtype in ("float32", "bfloat16"):
        config = preset("tiny", dtype=dtype)
        assert transformer_module.resolved_attention_implementation(config, 8, 8) == "xla"  # a CPU
    config = preset("tiny", dtype="bfloat16", attention_implementation="cudnn")
    assert transformer_module.resolved_attention_implementation(config, 8, 8) == "cudnn"
