"""A work queue of independent, resumable integrations (the scheduler behind :func:`jaxrm.flow.first_passage`).

A fixed number of *slots* integrate one item each for a short *segment* of steps; a slot whose
item finished takes the next queued item. A batch therefore costs about the sum of the items'
step counts, not ``batch x slowest``. When there are more items than slots, the stragglers move
to a narrow set of slots once few items are left, so they no longer pay for idle ones.

The scheduler knows nothing of ODEs: a segment is any pure function
``segment(tau, state, dt, args, active) -> Segment`` that advances one item by at most a fixed
number of steps and reports its :class:`Status`, and, for an item that finished, its *outcome*:
what the outputs keep of it. ``active`` is False for a slot with no item left
(it holds a finished item's state): the segment should do no work there, and its result is
ignored.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

# Slots per device, and the width of the queue's last phase.
DEFAULT_SLOTS = 32
TAIL_SLOTS = 4


def bucket(num_items: int, slots: int) -> tuple[int, int]:
    """``(width, padded)``: the slots to use for ``num_items`` items, and the count of items
    (padding included) that the queue's program is compiled for.

    With more items than ``slots``, ``width`` is ``slots`` and ``padded`` is ``slots`` times a
    power of two; the padding is never loaded into a slot. With fewer, ``width = padded`` is the
    count rounded up to ``2^k`` or ``3 x 2^k`` (at most ``slots``); the padding then sits in idle slots, which
    compute alongside the others (results discarded), so such a batch costs up to 1.5x its own
    width. Batches of sizes in the same bucket run the same compiled program (JAX compiles one
    per input shape); the padding costs at most as much memory again as the items.

    >>> bucket(17, 32), bucket(60, 32), bucket(1536, 32), bucket(2048, 32), bucket(100, 24)
    ((24, 24), (32, 64), (32, 2048), (32, 2048), (24, 192))
    """
    if num_items <= slots:
        power = 1 << (num_items - 1).bit_length()
        width = min(slots, 3 * power // 4 if power >= 4 and 3 * power // 4 >= num_items else power)
        return width, width
    return slots, slots << (-(-num_items // slots) - 1).bit_length()


class Status(enum.IntEnum):
    """Where an item's integration stands."""

    RUNNING = 0
    REACHED = 1  # the event (the gain) was reached
    NOT_REACHED = 2  # t_max passed, or the gain was proven out of reach
    FAILED = 3  # the step size no longer moves the time, or max_steps spent


class Segment(NamedTuple):
    """One item after a segment: where to resume (or where it ended), its status, and what the
    outputs keep of it if it finished (``outcome``: the same pytree structure every time)."""

    tau: Any
    state: Any
    dt: Any
    num_steps: Any
    status: Any
    outcome: Any


class _Slots(NamedTuple):
    item: Any  # index of the item in each slot; -1 when idle
    tau: Any
    state: Any
    dt: Any
    steps: Any


class Outputs(NamedTuple):
    """Per item: the time where it ended, its outcome, the steps it took and its :class:`Status`."""

    tau: Any
    outcome: Any
    steps: Any
    status: Any


def drain(
    segment: Callable[..., Segment],
    states,
    first_dt,
    args,
    num_valid,
    *,
    num_slots: int,
    max_steps: int,
) -> Outputs:
    """Run items ``0 .. num_valid - 1`` through ``num_slots`` slots until each is done (traceable).

    ``states`` (a pytree), ``first_dt`` and ``args`` have a leading item axis; entries past
    ``num_valid`` are padding and never run (their outputs: tau inf, outcome zeros, status RUNNING). An item
    whose steps pass ``max_steps`` is FAILED, with the outcome of its last segment.
    """
    num_items = first_dt.shape[0]
    dtype = first_dt.dtype
    vmapped = jax.vmap(segment)
    take = lambda tree, index: jax.tree.map(lambda x: x[index], tree)  # noqa: E731

    def load(item):
        """Slots holding ``item`` (-1: idle) at the start of their integration."""
        index = jnp.clip(item, 0, num_items - 1)
        return _Slots(
            item, jnp.zeros(item.shape, dtype), take(states, index), first_dt[index], jnp.zeros(item.shape, jnp.int32)
        )

    def body(carry):
        slots, next_item, out = carry
        active = slots.item >= 0
        result = vmapped(slots.tau, slots.state, slots.dt, take(args, jnp.clip(slots.item, 0, num_items - 1)), active)
        steps = slots.steps + result.num_steps
        status = jnp.where((result.status == Status.RUNNING) & (steps >= max_steps), Status.FAILED, result.status)
        finished = active & (status != Status.RUNNING)
        write = jnp.where(finished, slots.item, num_items)  # out of range: dropped
        out = Outputs(
            out.tau.at[write].set(result.tau, mode="drop"),
            jax.tree.map(lambda o, new: o.at[write].set(new, mode="drop"), out.outcome, result.outcome),
            out.steps.at[write].set(steps, mode="drop"),
            out.status.at[write].set(status, mode="drop"),
        )
        # Finished slots take the next items of the queue, in slot order.
        queued = next_item + jnp.cumsum(finished) - 1
        item = jnp.where(finished, jnp.where(queued < num_valid, queued, -1), slots.item)
        fresh = finished & (item >= 0)
        continued = _Slots(item, result.tau, result.state, result.dt, steps)
        slots = jax.tree.map(
            lambda new, old: jnp.where(fresh.reshape(-1, *([1] * (old.ndim - 1))), new, old), load(item), continued
        )
        return slots, next_item + jnp.sum(finished), out

    def run(slots, next_item, out, keep_going):
        return jax.lax.while_loop(lambda c: keep_going(*c), body, (slots, next_item, out))

    one_item = jax.eval_shape(segment, jnp.zeros((), dtype), take(states, 0), first_dt[0], take(args, 0), True)
    out = Outputs(
        jnp.full(num_items, jnp.inf, dtype),
        jax.tree.map(lambda x: jnp.zeros((num_items, *x.shape), x.dtype), one_item.outcome),
        jnp.zeros(num_items, jnp.int32),
        jnp.zeros(num_items, jnp.int32),
    )
    first = jnp.arange(num_slots)
    slots, next_item = load(jnp.where(first < num_valid, first, -1)), jnp.asarray(num_slots)
    if num_items <= num_slots:
        # Every item starts at once. A narrow last phase would be a second copy of the segment
        # to compile (most of a small batch's cost), for a gain on stragglers alone.
        return run(slots, next_item, out, lambda s, n, o: jnp.any(s.item >= 0))[2]
    tail = min(TAIL_SLOTS, num_slots)
    slots, next_item, out = run(slots, next_item, out, lambda s, n, o: (n < num_valid) | (jnp.sum(s.item >= 0) > tail))
    order = jnp.argsort(slots.item < 0, stable=True)[:tail]
    slots, next_item, out = run(take(slots, order), next_item, out, lambda s, n, o: jnp.any(s.item >= 0))
    return out
