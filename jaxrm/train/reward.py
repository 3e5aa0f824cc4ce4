"""Bradley-Terry reward-model training on preference pairs.

The loss (docs/theory.md#experiments-of-razin-et-al, as TRL's ``center_rewards_coefficient``)
for rewards ``r_c`` of chosen and ``r_r`` of rejected responses is

    L = mean(-log sigmoid(r_c - r_r)) + centering * mean((r_c + r_r)^2),

the second term pulling the reward scale towards zero mean without changing the preferences.
The whole run is one compiled ``while_loop`` over optimizer steps; Python only calls it between
checkpoint and evaluation steps, so the program compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Callable, Sequence

import flax.struct
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
    check_int,
    check_int_sequence,
    check_token_ids,
    checked,
)
from jaxrm.models.checkpoint import save_model
from jaxrm.models.sampling import pad_sequences
from jaxrm.models.transformer import RewardModel
from jaxrm.studies import check_out_directory
from jaxrm.train.loop import epoch_order, make_minibatch_loop
from jaxrm.train.optimizers import stack_layers


def bradley_terry_loss(chosen_rewards, rejected_rewards, *, centering: float = 0.0):
    """``mean(-log sigmoid(r_c - r_r)) + centering * mean((r_c + r_r)^2)`` over pairs.

    >>> float(bradley_terry_loss(jnp.array([0.0]), jnp.array([0.0])))  # log 2
    0.6931...
    """
    margin = chosen_rewards - rejected_rewards
    loss = -jnp.mean(jax.nn.log_sigmoid(margin))
    if centering:
        loss = loss + centering * jnp.mean((chosen_rewards + rejected_rewards) ** 2)
    return loss


def pairwise_accuracy(chosen_rewards, rejected_rewards):
    """Fraction of pairs with ``r_c > r_r`` (a tie disagrees with a strict preference)."""
    return jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32))


@flax.struct.dataclass
class PreferencePairs:
    """``n`` preference pairs: a left-padded prompt and two right-padded responses each.

    Arrays: ``prompt``/``prompt_mask`` ``[n, P]``, ``chosen``/``chosen_mask`` and
    ``rejected``/``rejected_mask`` ``[n, R]``. Build from token lists with :meth:`from_lists`
    (int32 ids and bool masks, both responses padded to one width ``R``); a pytree, so it can be
    indexed and moved with ``jax.tree.map``.

    Attributes:
      prompt: ``[n, P]`` token ids of the prompts, left-padded (padding first).
      prompt_mask: ``[n, P]`` True (or 1) on the prompts' real tokens, False on padding.
      chosen: ``[n, R]`` token ids of the preferred responses, right-padded (padding last).
      chosen_mask: ``[n, R]`` True on the preferred responses' real tokens.
      rejected: ``[n, R]`` token ids of the dispreferred responses, right-padded.
      rejected_mask: ``[n, R]`` True on the dispreferred responses' real tokens.
    """

    prompt: jax.Array
    prompt_mask: jax.Array
    chosen: jax.Array
    chosen_mask: jax.Array
    rejected: jax.Array
    rejected_mask: jax.Array

    @classmethod
    def from_lists(cls, prompts, chosen, rejected, *, pad_id: int = 0) -> PreferencePairs:
        if not len(prompts) == len(chosen) == len(rejected):
            raise ValueError(
                f"mismatched pair lists: {len(prompts)} prompts, {len(chosen)} chosen, {len(rejected)} rejected."
            )
        width = max((len(r) for r in (*chosen, *rejected)), default=0)
        prompt, prompt_mask = pad_sequences(prompts, side="left", pad_id=pad_id)
        chosen, chosen_mask = pad_sequences(chosen, length=width, side="right", pad_id=pad_id)
        rejected, rejected_mask = pad_sequences(rejected, length=width, side="right", pad_id=pad_id)
        return cls(prompt, prompt_mask, chosen, chosen_mask, rejected, rejected_mask)

    def __len__(self) -> int:
        return self.prompt.shape[0]

    def validate(self, vocab_size: int) -> None:
        """Clear errors for pairs that cannot be trained on (mismatched shapes, empty, out of vocabulary)."""
        n = len(self)
        for name in ("prompt", "chosen", "rejected"):
            tokens, mask = getattr(self, name), getattr(self, f"{name}_mask")
            if np.ndim(tokens) != 2 or np.shape(tokens) != np.shape(mask) or np.shape(tokens)[0] != n:
                raise ValueError(
                    f"mismatched pairs: {name} {np.shape(tokens)} and {name}_mask {np.shape(mask)} must both be "
                    f"[{n}, length] like prompt {np.shape(self.prompt)}."
                )
            check_token_ids(name, tokens, vocab_size)
            empty = ~np.asarray(mask).astype(bool).any(axis=1)
            if empty.any():
                what = "prompts" if name == "prompt" else f"{name} responses"
                raise ValueError(
                    f"{int(empty.sum())} empty {what} (all padding), first at pair {int(np.argmax(empty))}."
                )
        if np.shape(self.chosen)[1] != np.shape(self.rejected)[1]:
            raise ValueError(
                f"mismatched pairs: chosen {np.shape(self.chosen)} and rejected {np.shape(self.rejected)} must be "
                "padded to one width (both responses are scored in one batch)."
            )

    def sequences(self, which: str):
        """``(tokens, mask)`` of prompt + ``which`` response (``"chosen"`` or ``"rejected"``)."""
        tokens = jnp.concatenate([self.prompt, getattr(self, which)], axis=1)
        mask = jnp.concatenate([self.prompt_mask, getattr(self, f"{which}_mask")], axis=1).astype(bool)
        return tokens, mask


def pair_rewards(model: RewardModel, pairs: PreferencePairs):
    """Rewards ``(r_chosen, r_rejected)`` of every pair, in one forward pass over ``2n`` sequences."""
    chosen, chosen_mask = pairs.sequences("chosen")
    rejected, rejected_mask = pairs.sequences("rejected")
    rewards = model(jnp.concatenate([chosen, rejected]), jnp.concatenate([chosen_mask, rejected_mask]))
    return jnp.split(rewards, 2)


@dataclasses.dataclass(frozen=True)
class RewardTrainConfig:
    """Bradley-Terry training hyperparameters, checked on construction (defaults: those of the
    reward models of docs/theory.md#experiments-of-razin-et-al, one epoch, batch 32, centering
    0.01, except the learning rate).

    The optimizer is global-norm clipping followed by AdamW (:meth:`optimizer`), run on the
    parameters stacked by layer role (:func:`jaxrm.train.optimizers.stack_layers`).

    Attributes:
      learning_rate: AdamW learning rate (> 0), constant after the warmup; default 1e-5 (the
        official reward models: 5e-7).
      batch_size: preference pairs per optimizer step (>= 1); each epoch drops its last
        incomplete batch.
      epochs: passes over the pairs (>= 1), each in a fresh random order.
      centering: coefficient (>= 0) of the centering term ``mean((r_c + r_r)^2)`` added to the
        Bradley-Terry loss; 0 turns it off.
      warmup_steps: optimizer steps (>= 0) of a linear warmup of the learning rate from 0; 0
        (default): no warmup.
      weight_decay: AdamW's decoupled weight decay (>= 0); default 0. It applies to every
        parameter, biases, LayerNorm scales and embeddings included (Hugging Face's Trainer
        leaves biases and LayerNorm weights out).
      max_grad_norm: the gradient is clipped to this global norm (> 0) before each update.
      seed: seed of the shuffling of the pairs (the model's initialisation is not drawn here).
    """

    learning_rate: float = checked(1e-5, POSITIVE)
    batch_size: int = checked(32, POSITIVE_INT)
    epochs: int = checked(1, POSITIVE_INT)
    centering: float = checked(0.01, NON_NEGATIVE)
    warmup_steps: int = checked(0, NON_NEGATIVE)
    weight_decay: float = checked(0.0, NON_NEGATIVE)
    max_grad_norm: float = checked(1.0, POSITIVE)
    seed: int = checked(0, NON_NEGATIVE)

    def __post_init__(self):
        check_fields(self)

    def optimizer(self) -> optax.GradientTransformation:
        schedule = optax.linear_schedule(0.0, self.learning_rate, self.warmup_steps) if self.warmup_steps else None
        return stack_layers(
            optax.chain(
                optax.clip_by_global_norm(self.max_grad_norm),
                optax.adamw(schedule or self.learning_rate, weight_decay=self.weight_decay),
            )
        )


@functools.lru_cache(maxsize=16)
def make_reward_train(graphdef: nnx.GraphDef, config: RewardTrainConfig):
    """The compiled minibatch loop of Bradley-Terry training (see :func:`jaxrm.train.loop.make_minibatch_loop`),
    vmapped over a leading axis of models (parameters, optimizer state, pairs, order and history;
    the step range is shared), and the optimizer: ``(run, optimizer)``. History rows are the loss
    and the batch accuracy. Cached, so reward models of one graph and config share one program."""
    optimizer = config.optimizer()

    def loss_fn(params, batch):
        chosen, rejected = pair_rewards(nnx.merge(graphdef, params), batch)
        return bradley_terry_loss(chosen, rejected, centering=config.centering), pairwise_accuracy(chosen, rejected)

    loop = make_minibatch_loop(loss_fn, optimizer)
    return jax.jit(jax.vmap(loop, in_axes=(0, 0, 0, 0, None, None, 0))), optimizer


def evaluate_reward_model(model: RewardModel, pairs: PreferencePairs, *, batch_size: int = 64) -> dict:
    """Pairwise accuracy, Bradley-Terry loss and mean reward margin over ``pairs``, scored
    ``batch_size`` pairs at a time."""
    check_int("batch_size", batch_size, low=1)
    pairs.validate(model.config.vocab_size)
    graphdef, params = nnx.split(model)
    rewards = _batched_rewards(graphdef, params, pairs, batch_size)
    chosen, rejected = jnp.asarray(rewards[0]), jnp.asarray(rewards[1])
    return {
        "accuracy": float(pairwise_accuracy(chosen, rejected)),
        "loss": float(bradley_terry_loss(chosen, rejected)),
        "margin": float(jnp.mean(chosen - rejected)),
    }


def _batched_rewards(graphdef, params, pairs: PreferencePairs, batch_size: int) -> np.ndarray:
    forward = _compiled_pair_rewards(graphdef)
    n = len(pairs)
    padded = -(-n // batch_size) * batch_size
    # Pad with copies of the first pair so every batch has one shape (one compiled program).
    index = np.concatenate([np.arange(n), np.zeros(padded - n, int)])
    chunks = [
        forward(params, jax.tree.map(lambda a: a[index[i : i + batch_size]], pairs))
        for i in range(0, padded, batch_size)
    ]
    return np.concatenate([np.stack([np.asarray(c), np.asarray(r)]) for c, r in chunks], axis=1)[:, :n]


@functools.lru_cache(maxsize=16)
def _compiled_pair_rewards(graphdef):
    return jax.jit(lambda params, batch: pair_rewards(nnx.merge(graphdef, params), batch))


@dataclasses.dataclass
class RewardTrainResult:
    """What :func:`train_reward_model` returns.

    Attributes:
      model: the trained reward model (the object passed in, updated in place).
      losses: ``[num_steps]`` float32 training loss of every optimizer step (Bradley-Terry plus
        the centering term) on that step's batch, at the parameters before the update;
        ``num_steps = epochs * (len(pairs) // batch_size)``.
      accuracies: ``[num_steps]`` float32 pairwise accuracy (share of ``r_c > r_r``) of each
        step's batch, at the same parameters.
      evaluations: one dict per step of ``eval_steps``, in step order: ``step``, and the
        ``accuracy``, ``loss`` (Bradley-Terry without centering) and mean reward ``margin``
        ``r_c - r_r`` over ``eval_pairs`` (:func:`evaluate_reward_model`).
      checkpoints: directories ``checkpoint_dir/step_{step:06d}`` written at ``checkpoint_steps``,
        in step order.
    """

    model: RewardModel
    losses: np.ndarray
    accuracies: np.ndarray
    evaluations: list[dict]
    checkpoints: list[Path]


def train_reward_model(
    model: RewardModel,
    pairs: PreferencePairs,
    config: RewardTrainConfig = RewardTrainConfig(),
    *,
    eval_pairs: PreferencePairs | None = None,
    eval_steps: tuple[int, ...] = (),
    checkpoint_dir: str | Path | None = None,
    checkpoint_steps: tuple[int, ...] = (),
    log: Callable[[str], None] | None = print,
) -> RewardTrainResult:
    """Train ``model`` by Bradley-Terry on ``pairs`` for ``config.epochs`` epochs (``model`` is updated).

    Each epoch visits the pairs in a fresh random order (seeded by ``config.seed``) in batches of
    ``config.batch_size``; a last incomplete batch is dropped. ``eval_steps`` and
    ``checkpoint_steps`` are optimizer-step counts (0 = before training); at each, ``eval_pairs``
    are scored and/or the model is saved to ``checkpoint_dir/step_{step:06d}`` (with the
    evaluation in its metadata). :func:`train_reward_models` trains several in one program.
    """
    (result,) = train_reward_models(
        model,
        [pairs],
        config,
        seeds=[config.seed],
        eval_pairs=eval_pairs,
        eval_steps=eval_steps,
        checkpoint_dirs=None if checkpoint_dir is None else [checkpoint_dir],
        checkpoint_steps=checkpoint_steps,
        log=log,
    )
    nnx.update(model, nnx.state(result.model))
    return dataclasses.replace(result, model=model)


def _check_converging(losses, first_step: int, config: RewardTrainConfig) -> None:
    """Raise ``FloatingPointError`` where a run's loss became NaN or infinite: nothing after it
    could be evaluated or saved (``losses``: ``[runs, steps]`` from optimizer step ``first_step``)."""
    bad = ~np.isfinite(np.asarray(losses))
    if bad.any():
        run, step = (int(i) for i in np.argwhere(bad)[0])
        raise FloatingPointError(
            f"reward-model training diverged: run {run}'s loss is {float(np.asarray(losses)[run, step])} at optimizer "
            f"step {first_step + step + 1} (learning_rate={config.learning_rate}); lower the learning rate. "
            "Checkpoints saved before that step are kept."
        )


def train_reward_models(
    model: RewardModel,
    datasets: Sequence[PreferencePairs],
    config: RewardTrainConfig = RewardTrainConfig(),
    *,
    seeds: Sequence[int] | None = None,
    eval_pairs: PreferencePairs | None = None,
    eval_steps: tuple[int, ...] = (),
    checkpoint_dirs: Sequence[str | Path] | None = None,
    checkpoint_steps: tuple[int, ...] = (),
    log: Callable[[str], None] | None = print,
) -> list[RewardTrainResult]:
    """Train one reward model per dataset, all from ``model``'s parameters, side by side in one
    vmapped program (``model`` itself is left as it is).

    Args:
      model: the initial reward model of every run.
      datasets: the preference pairs of each run; all of the same shapes (same number of pairs
        and padded lengths), so that the runs share one compiled program.
      config: the hyperparameters shared by the runs.
      seeds: the shuffling seed of each run (default: ``config.seed`` for all).
      eval_pairs, eval_steps: at each of these optimizer steps (0 = before training), every run
        is scored on ``eval_pairs`` (:func:`evaluate_reward_model`).
      checkpoint_dirs, checkpoint_steps: at each of these steps, run ``i`` is saved to
        ``checkpoint_dirs[i]/step_{step:06d}`` with its evaluation in the metadata.
      log: where progress lines go (None: silent); they report the mean over the runs.

    Returns one :class:`RewardTrainResult` per dataset, in order. Every argument is checked
    before training starts.
    """
    check_instance("model", model, RewardModel)
    check_instance("config", config, RewardTrainConfig)
    if not datasets:
        raise ValueError("datasets must hold at least one set of preference pairs.")
    shapes = [jax.tree.map(np.shape, pairs) for pairs in datasets]
    if any(shape != shapes[0] for shape in shapes):
        raise ValueError(
            "every dataset must have the same shapes (one compiled program for all runs); got "
            + ", ".join(f"{len(p)} pairs of widths {np.shape(p.chosen)[1]}" for p in datasets)
            + ". Cut them to a common number of pairs and pad them to a common width."
        )
    seeds = [config.seed] * len(datasets) if seeds is None else check_int_sequence("seeds", seeds, low=0)
    if len(seeds) != len(datasets):
        raise ValueError(f"seeds must hold one int per dataset ({len(datasets)}), got {seeds!r}.")
    if checkpoint_dirs is not None and len(checkpoint_dirs) != len(datasets):
        raise ValueError(f"checkpoint_dirs must hold one directory per dataset ({len(datasets)}).")
    if checkpoint_dirs is not None and len({Path(d).resolve() for d in checkpoint_dirs}) < len(checkpoint_dirs):
        raise ValueError(
            f"checkpoint_dirs must be distinct directories (one per run), got {list(map(str, checkpoint_dirs))}."
        )
    eval_steps, checkpoint_steps = (
        check_int_sequence(name, steps, low=0)
        for name, steps in (("eval_steps", eval_steps), ("checkpoint_steps", checkpoint_steps))
    )
    vocab = model.config.vocab_size
    for pairs in datasets:
        pairs.validate(vocab)
    if eval_pairs is not None:
        eval_pairs.validate(vocab)
    orders = np.stack([epoch_order(len(datasets[0]), config.batch_size, config.epochs, int(s)) for s in seeds])
    num_steps, steps_per_epoch = orders.shape[1], orders.shape[1] // config.epochs
    stops = sorted({*eval_steps, *checkpoint_steps, num_steps})
    if stops[0] < 0 or stops[-1] > num_steps:
        raise ValueError(f"eval/checkpoint steps must lie in [0, {num_steps}], got {stops}.")
    if checkpoint_steps and checkpoint_dirs is None:
        raise ValueError("checkpoint_steps need checkpoint_dirs (checkpoint_dir for one model).")
    if eval_steps and eval_pairs is None:
        raise ValueError("eval_steps need eval_pairs.")
    for index, directory in enumerate(checkpoint_dirs or ()):
        # Before the training: a directory that cannot be written would fail at the first save
        # and lose every step trained until then.
        check_out_directory(
            directory, option=f"checkpoint_dirs[{index}]" if len(checkpoint_dirs) > 1 else "checkpoint_dir"
        )
        taken = [s for s in checkpoint_steps if (Path(directory) / f"step_{s:06d}").exists()]
        if taken:
            raise FileExistsError(f"{directory} already holds checkpoints for steps {taken}.")

    count = len(datasets)
    pairs = jax.tree.map(lambda *arrays: jnp.stack([jnp.asarray(a) for a in arrays]), *datasets)
    graphdef, params = nnx.split(model)
    run, optimizer = make_reward_train(graphdef, config)
    params = jax.tree.map(lambda x: jnp.broadcast_to(x, (count, *x.shape)), params)
    opt_state = jax.vmap(optimizer.init)(params)
    history = jnp.zeros((count, 2, num_steps), jnp.float32)
    evaluations, checkpoints = [[] for _ in range(count)], [[] for _ in range(count)]
    done, started = 0, time.perf_counter()
    for stop in sorted({0, *stops}):
        if stop > done:
            params, opt_state, history = run(params, opt_state, pairs, jnp.asarray(orders), done, stop, history)
            _check_converging(history[:, 0, done:stop], done, config)
            done = stop
        if done not in eval_steps and done not in checkpoint_steps and (log is None or done == 0):
            continue
        records = []
        for index in range(count):
            record = {"step": done}
            trained = nnx.merge(graphdef, jax.tree.map(lambda x: x[index], params))
            if done in eval_steps:
                record.update(evaluate_reward_model(trained, eval_pairs))
                evaluations[index].append(record)
            if done in checkpoint_steps:
                path = Path(checkpoint_dirs[index]) / f"step_{done:06d}"
                checkpoints[index].append(save_model(trained, path, metadata=record))
            records.append(record)
        if log is not None and done > 0:
            recent = np.asarray(history[:, :, max(0, done - steps_per_epoch) : done]).mean(axis=(0, 2))
            extra = f" eval accuracy {np.mean([r['accuracy'] for r in records]):.3f}" if done in eval_steps else ""
            runs = f" (mean of {count} runs)" if count > 1 else ""
            log(
                f"reward model step {done}/{num_steps}: loss {recent[0]:.4f} batch accuracy {recent[1]:.3f}"
                f"{extra}{runs} ({time.perf_counter() - started:.1f} s)"
            )
    history = np.asarray(history)
    return [
        RewardTrainResult(
            nnx.merge(graphdef, jax.tree.map(lambda x: x[index], params)),
            history[index, 0],
            history[index, 1],
            evaluations[index],
            checkpoints[index],
        )
        for index in range(count)
    ]
