"""Supervised fine-tuning: maximum likelihood of demonstration responses given their prompts.

The loss is the mean negative log-likelihood of the response tokens,
``-sum_{b,t} m[b,t] log pi(y[b,t] | y[b,<t]) / sum_{b,t} m[b,t]``, with ``m`` the loss mask
(response tokens only: prompts are conditioned on, not learned).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxrm._checks import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    check_fields,
    check_instance,
    check_token_ids,
    checked,
)
from jaxrm.models.transformer import CausalLM
from jaxrm.train.loop import epoch_order, make_minibatch_loop
from jaxrm.train.optimizers import stack_layers


def _targets(mask, loss_mask):
    """``[n, length - 1]``: which tokens are learned, each from the position before it. Both must
    be real tokens, so a row's first real token (after left padding too) has no prefix and is
    never a target."""
    return loss_mask[:, 1:] & mask[:, 1:] & mask[:, :-1]


def sequence_nll(model: CausalLM, tokens, mask, loss_mask):
    """Mean negative log-likelihood of the real tokens (``mask``) where ``loss_mask`` is True, each
    predicted from its prefix; a row's first real token has no prefix and is never a target.
    Each row's real tokens must be contiguous (padding before or after them, as
    :func:`jaxrm.models.pad_sequences` lays them out): a token right after padding inside a row
    is not learned."""
    logits = model(tokens, mask)[:, :-1]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    targets = tokens[:, 1:]
    token_nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    weights = _targets(jnp.asarray(mask, bool), jnp.asarray(loss_mask, bool)).astype(jnp.float32)
    return jnp.sum(token_nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning hyperparameters, checked on construction.

    The optimizer is global-norm clipping followed by Adam at a constant learning rate, run on the
    parameters stacked by layer role (:func:`jaxrm.train.optimizers.stack_layers`).

    Attributes:
      learning_rate: Adam learning rate (> 0); default 1e-3.
      batch_size: demonstrations per optimizer step (>= 1); each epoch drops its last
        incomplete batch.
      epochs: passes over the demonstrations (>= 1), each in a fresh random order.
      max_grad_norm: the gradient is clipped to this global norm (> 0) before each update.
      seed: seed of the shuffling of the demonstrations (the model's initialisation is not drawn
        here).
    """

    learning_rate: float = checked(1e-3, POSITIVE)
    batch_size: int = checked(32, POSITIVE_INT)
    epochs: int = checked(1, POSITIVE_INT)
    max_grad_norm: float = checked(1.0, POSITIVE)
    seed: int = checked(0, NON_NEGATIVE)

    def __post_init__(self):
        check_fields(self)


@functools.lru_cache(maxsize=16)
def _compiled_sft_loop(graphdef: nnx.GraphDef, config: SFTConfig):
    optimizer = stack_layers(
        optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.adam(config.learning_rate))
    )

    def loss_fn(params, batch):
        loss = sequence_nll(nnx.merge(graphdef, params), *batch)
        return loss, loss

    return jax.jit(make_minibatch_loop(loss_fn, optimizer)), optimizer


def train_sft(
    model: CausalLM, tokens, mask, loss_mask, config: SFTConfig = SFTConfig(), *, log: Callable | None = print
) -> np.ndarray:
    """Fit ``model`` (updated in place) to ``[n, length]`` demonstrations; returns the loss of every step.

    ``mask`` marks real tokens, contiguous in each row (padding before or after them, never
    between; refused otherwise), ``loss_mask`` the tokens to learn (the responses): a token is
    learned where both are True, and never a row's first real token, which has no prefix to be
    predicted from.
    """
    check_instance("model", model, CausalLM)
    check_instance("config", config, SFTConfig)
    tokens, mask, loss_mask = (np.asarray(a) for a in (tokens, mask, loss_mask))
    for name, array in (("mask", mask), ("loss_mask", loss_mask)):
        if array.dtype != bool:
            raise ValueError(f"{name} must be a bool array, got dtype {array.dtype}.")
    if not (tokens.shape == mask.shape == loss_mask.shape and tokens.ndim == 2):
        raise ValueError(
            f"tokens {tokens.shape}, mask {mask.shape}, loss_mask {loss_mask.shape} must be one [n, length]."
        )
    check_token_ids("tokens", tokens, model.config.vocab_size)
    # A real token, then padding, then a real token again: its first token after the gap would
    # silently not be learned (its target needs a real token just before it).
    gapped = (mask[:, 1:] & ~mask[:, :-1] & np.cumsum(mask, axis=1)[:, :-1].astype(bool)).any(axis=1)
    if gapped.any():
        raise ValueError(
            f"mask has padding between real tokens in {int(gapped.sum())} row(s) (first: row {int(np.argmax(gapped))}); "
            "pad before or after each row's tokens (jaxrm.models.pad_sequences left-pads)."
        )
    learned = _targets(mask, loss_mask).any(axis=1)
    if not learned.all():
        raise ValueError(
            f"every demonstration needs at least one response token to learn after its first real token; "
            f"{int((~learned).sum())} have none (first: row {int(np.argmin(learned))})."
        )
    order = epoch_order(len(tokens), config.batch_size, config.epochs, config.seed)
    graphdef, params = nnx.split(model)
    run, optimizer = _compiled_sft_loop(graphdef, config)
    data = tuple(jnp.asarray(a) for a in (tokens, mask.astype(bool), loss_mask.astype(bool)))
    began = time.perf_counter()
    history = jnp.zeros((2, len(order)))
    params, _, history = run(params, optimizer.init(params), data, jnp.asarray(order), 0, len(order), history)
    nnx.update(model, params)
    losses = np.asarray(history[0])
    if log is not None:
        window = max(1, min(10, len(losses) // 2))  # first and last steps, apart when there are few
        log(
            f"SFT: {len(order)} steps, loss {losses[:window].mean():.3f} -> {losses[-window:].mean():.3f} "
            f"({time.perf_counter() - began:.1f} s)"
        )
    return losses
