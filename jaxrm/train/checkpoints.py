"""Checkpoints of a run's training state (orbax), every few steps, with fallback on damaged ones."""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxrm._checks import check_int
from jaxrm.models.checkpoint import is_prng_key, tree_checksum


class RunCheckpoints:
    """Checkpoints of a training state every few steps, keeping the last ``keep`` (orbax manager).

    A state is any pytree of arrays (typed PRNG keys are stored as their raw key data); each
    checkpoint also carries a small JSON record, with the state's
    :func:`~jaxrm.models.checkpoint.tree_checksum` added. Saves are atomic (orbax writes to a
    temporary directory and renames it when complete), so a run killed while saving leaves the
    previous checkpoints intact; :meth:`restore_latest` falls back to an older checkpoint, with a
    warning, when the newest one's files are damaged (missing, truncated, undecodable) or its
    values fail the checksum. A damaged checkpoint is moved aside to ``<step>.damaged`` (kept for
    inspection, no longer a step), so that the resumed run saves that step again. Any other
    failure to restore (out of memory, a file system that is unavailable for now) is raised and
    leaves every checkpoint in place: setting them all aside would restart the run from step 0.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3):
        check_int("keep", keep, low=1)
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        handlers = {"state": _state_handler(), "record": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def save(self, step: int, state, record: dict) -> None:
        state = jax.tree.map(_storable, state, is_leaf=is_prng_key)
        record = {**record, "checksum": tree_checksum(state), "layout": _layout(state)}
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), record=ocp.args.JsonSave(record))
        if not self.manager.save(step, args=args):
            raise RuntimeError(
                f"the checkpoint of step {step} was not written in {self.directory} (its steps: {self.steps()})."
            )
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, template):
        """``(step, state, record)`` of the newest readable checkpoint, or ``None`` if there is none.

        ``template`` is a state of the same structure (arrays or ``jax.ShapeDtypeStruct``, with
        the shardings to restore onto). A checkpoint whose state is laid out otherwise (other
        leaves, shapes or dtypes, as recorded at save) raises ``ValueError`` and stays in place: it
        is not damaged, the template is not its state's.
        """
        abstract = jax.tree.map(_abstract, template, is_leaf=is_prng_key)
        expected = _layout(abstract)
        for step in reversed(self.steps()):
            record = self._restore(step, record=ocp.args.JsonRestore())
            if record is None:
                continue
            record = record["record"]
            stored = record.get("layout")  # absent from checkpoints of earlier versions
            if stored is not None and stored != expected:
                difference = next(
                    (
                        f"{a[0]}: stored {a[1:]}, template {b[1:]}"
                        if a[0] == b[0]
                        else f"the stored leaf {a[0]} where the template has {b[0]}"
                        for a, b in zip(stored, expected)
                        if a != b
                    ),
                    f"{len(stored)} leaves stored, {len(expected)} in the template",
                )
                raise ValueError(
                    f"the checkpoint at step {step} in {self.directory} holds a state laid out otherwise than the "
                    f"template ({difference}); it was left in place."
                )
            restored = self._restore(
                step, state=ocp.args.PyTreeRestore(abstract, ocp.checkpoint_utils.construct_restore_args(abstract))
            )
            if restored is None:
                continue
            if tree_checksum(restored["state"]) != record.get("checksum"):
                self._set_aside(step, "is damaged (checksum mismatch)")
                continue
            state = jax.tree.map(
                lambda stored, like: (
                    jax.random.wrap_key_data(stored, impl=jax.random.key_impl(like)) if is_prng_key(like) else stored
                ),
                restored["state"],
                template,
                is_leaf=is_prng_key,
            )
            return step, state, record
        return None

    def _restore(self, step: int, **items):
        """The named items of a checkpoint, or None when its files are damaged (then set aside)."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # noqa: BLE001 -- orbax raises a bare Exception for a damaged array file
            if not _is_damage(error):
                raise RuntimeError(
                    f"restoring the checkpoint at step {step} in {self.directory} failed, and the error does not "
                    "say that its files are damaged, so it was left in place; rerun to resume from it."
                ) from error
            self._set_aside(step, f"is unreadable ({type(error).__name__}: {error})")
            return None

    def _set_aside(self, step: int, why: str) -> None:
        """Move a damaged checkpoint out of the steps, so that the same step can be saved again.

        Process 0 moves it; under ``jax.distributed`` the others wait for the move (a broadcast
        of the name it chose) before they reload the steps. That needs every process to find the
        same checkpoint damaged: true of a checksum mismatch (the checksum is computed over the
        global arrays), not of a file that only some processes read and fail on, where the
        processes would wait for each other in different collectives."""
        suffix = 0
        if jax.process_index() == 0:
            while self._aside(step, suffix).exists():
                suffix += 1
            (self.directory / str(step)).rename(self._aside(step, suffix))
        if jax.process_count() > 1:
            suffix = int(multihost_utils.broadcast_one_to_all(np.int32(suffix)))
        self.manager.reload()
        warnings.warn(
            f"checkpoint at step {step} {why}; moved to {self._aside(step, suffix).name}, trying an older one."
        )

    def _aside(self, step: int, suffix: int) -> Path:
        return self.directory / (f"{step}.damaged" + (f".{suffix}" if suffix else ""))

    def close(self) -> None:
        self.manager.close()


# Errors that say a checkpoint's files are damaged: orbax and TensorStore report missing,
# truncated or undecodable files as ValueError (DATA_LOSS, OUT_OF_RANGE, FAILED_PRECONDITION),
# often as the cause of a bare Exception; a missing item is a KeyError. These status codes say
# instead that reading failed for now.
_DAMAGE_ERRORS = (ValueError, KeyError, FileNotFoundError)
_TRANSIENT_STATUS = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED")


def _is_damage(error: BaseException) -> bool:
    """Whether a restore error, or an error it was raised from, says that the files are damaged."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    if any(status in str(e) for e in chain for status in _TRANSIENT_STATUS):
        return False
    return any(isinstance(e, _DAMAGE_ERRORS) for e in chain)


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """orbax's pytree handler, less replica-parallel saving on CPU devices.

    Replica-parallel saving has each replica of a replicated array write a slice of it, to spread
    the writes over hosts. On the CPU devices of one host it only slices: one eagerly compiled
    program per array shape and device, 64 programs and about 3 s at a run's first save for the
    tiny test policy on 4 devices. orbax already turns it off on GPUs; elsewhere its default
    stands. The files are the same either way.
    """
    cpu = jax.default_backend() == "cpu"
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False if cpu else None)),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (np.number, ocp.type_handlers.ScalarHandler()),
        (int, ocp.type_handlers.ScalarHandler()),
        (float, ocp.type_handlers.ScalarHandler()),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _layout(tree) -> list:
    """``[path, shape, dtype]`` of every leaf (arrays or ``jax.ShapeDtypeStruct``), as JSON."""
    return [
        [jax.tree_util.keystr(path), list(leaf.shape), str(leaf.dtype)]
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _storable(x):
    return jax.random.key_data(x) if is_prng_key(x) else x


def _abstract(x):
    x = jax.random.key_data(x) if is_prng_key(x) else x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
