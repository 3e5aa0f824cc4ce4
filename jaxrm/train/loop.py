"""Minibatch optimisation as one compiled loop, shared by reward-model and SFT training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def epoch_order(num_items: int, batch_size: int, epochs: int, seed: int) -> np.ndarray:
    """``[steps, batch_size]`` item indices: a fresh permutation per epoch, the last partial batch dropped."""
    steps_per_epoch = num_items // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{num_items} examples are fewer than one batch of batch_size={batch_size}.")
    rng = np.random.default_rng(seed)
    order = [rng.permutation(num_items)[: steps_per_epoch * batch_size] for _ in range(epochs)]
    return np.concatenate(order).reshape(steps_per_epoch * epochs, batch_size)


def make_minibatch_loop(loss_fn, optimizer: optax.GradientTransformation):
    """Pure ``run(params, opt_state, data, order, start, stop, history) -> (params, opt_state, history)``.

    ``loss_fn(params, batch) -> (loss, metric)`` with ``batch`` the rows ``order[step]`` of every
    array in the pytree ``data``. Steps ``start..stop-1`` run in a ``fori_loop`` and write
    ``(loss, metric)`` into ``history``, a ``[2, num_steps]`` array. The data is an input, not a
    constant of the program, so one compiled program serves every dataset and step range of the
    same shapes.
    """

    def run(params, opt_state, data, order, start, stop, history):
        def one_step(step, carry):
            params, opt_state, history = carry
            batch = jax.tree.map(lambda a: a[order[step]], data)
            (loss, metric), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return params, opt_state, history.at[:, step].set(jnp.stack([loss, metric]))

        return jax.lax.fori_loop(start, stop, one_step, (params, opt_state, history))

    return run
