"""RLHF for transformer policies: RLOO / GRPO / REINFORCE iterations as one pure, compiled step.

One iteration (docs/theory.md#official-rloo-and-grpo-semantics):

1. take the next ``prompts_per_iteration`` prompts and draw ``k`` responses each with the KV-cache
   sampler;
2. score them with the teacher (a :class:`~jaxrm.models.RewardModel` or any jittable
   ground-truth function), normalise with a fixed mean/std measured once on the initial policy;
3. per-token log-probs of the policy (at sampling time) and of the frozen reference;
4. fold ``kl_coef * sum_t KL_t`` into the reward (or add it to the loss), compute advantages
   (leave-one-out, group-normalised, or plain);
5. ``epochs`` passes of ``minibatches`` optax updates on the clipped surrogate, each gradient
   accumulated over ``microbatches``.

``make_iteration(...)`` returns the pure ``iteration(state, data) -> (state, metrics)``;
``make_train(...)`` scans it for a run (``vmap`` it over seeds and teachers): the one compiled
unit that :func:`jaxrm.train.driver.run_rlhf`, the one driver, runs in chunks.

Log-probs for training (new, old and reference) use ``logits / temperature``; top-k/top-p only
shape which tokens are drawn.

Metrics of an iteration (means over its ``prompts_per_iteration x k`` responses):
``proxy_reward`` (the teacher's raw score), ``reward_variance`` (per prompt over its k samples,
``ddof=1``, averaged), ``kl`` (``sum_t log pi - log pi_ref``, the unbiased k1 estimate of the
sequence KL: it can dip below 0 near the reference; with top-k/top-p on, the samples come from
the filtered policy and the log-probs from the unfiltered one, so it estimates neither's KL
exactly), ``entropy`` (per-token, of the tempered
policy), ``clip_fraction``, ``loss``, ``response_length``; with a ground-truth function also
``ground_truth_reward`` and ``on_policy_accuracy`` (the teacher against the ground truth over
the pairs of each prompt's samples, a tie agreeing only with a tie). ``loss``, ``entropy`` and
``clip_fraction`` are measured during the updates: each is a mean over the minibatch's tokens
(or sequences), then an unweighted mean over the iteration's epochs and minibatches, each
minibatch measured after the updates before it.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxrm import metrics, pg
from jaxrm._checks import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    check_fields,
    check_instance,
    check_int,
    check_key,
    checked,
    one_of,
)
from jaxrm.models.sampling import MIN_TEMPERATURE, SamplingOptions, check_prompts, make_sampler, token_log_probs
from jaxrm.models.transformer import CausalLM, RewardModel
from jaxrm.train.optimizers import stack_layers

KL_PLACEMENTS = ("reward", "loss")

# A teacher maps (params, prompt, prompt_mask, response, response_mask) -> rewards [batch]; ``params``
# is the reward model's state (or None for a ground-truth function). It scores each row on its own:
# an iteration calls it on one microbatch of rows at a time.
RewardFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class RLHFConfig:
    """Hyperparameters of an RLHF run, validated on construction.

    The plain defaults follow the official RLOO (docs/theory.md#official-rloo-and-grpo-semantics)
    except in five settings chosen for small models trained for few iterations: one minibatch
    (the official run takes two optimizer steps per rollout batch, so its clip can act),
    learning rate 1e-6 (official 1e-7), gradient clipping at norm 1 (official: none), the
    ``std`` reward normalisation (official: ``rsqrt_var``) and 64 new tokens (official 512).
    :meth:`official_rloo` gives the official values.

    Attributes:
      advantage_estimator: a key of :data:`jaxrm.pg.ADVANTAGE_ESTIMATORS`: ``rloo``
        (leave-one-out), ``grpo`` (``(r - mean) / (std + 1e-4)`` over the group, std with
        ``ddof=1``: TRL's form; the official GRPO multiplies by ``rsqrt(var + 1e-8)`` instead, which
        differs for groups of small variance), ``dr_grpo`` (group mean only) or ``reinforce`` (no
        baseline).
      samples_per_prompt: ``k``, responses drawn per prompt (>= 2 unless ``reinforce``).
      prompts_per_iteration: prompts per rollout batch; a multiple of the mesh's ``data`` axis.
      max_new_tokens: longest response.
      temperature: sampling temperature (``>= 1e-5``, :data:`~jaxrm.models.sampling.MIN_TEMPERATURE`);
        training log-probs use ``logits / temperature``.
      top_k: keep the ``top_k`` largest logits when sampling (0: off).
      top_p: nucleus threshold in (0, 1] (1: off).
      eos_id: token that ends a response (included in its mask); None: fixed length.
      pad_id: token written after the end of a response.
      cache_phases: the sampler's KV cache grows in this many phases, so that early tokens
        attend over a shorter cache (:class:`jaxrm.models.sampling.SamplingOptions`); more
        phases compile longer.
      kl_coef: ``lam >= 0``, weight of the KL to the reference.
      kl_estimator: a name of :data:`jaxrm.metrics.KL_ESTIMATORS` (``k1``, ``k2``, ``k3``).
      kl_placement: ``reward`` folds ``kl_coef * sum_t KL_t`` into each sequence's reward before
        the advantages (the official RLOO); ``loss`` adds ``kl_coef * aggregate(KL_t)`` of the
        current log-probs to the loss, so it acts on the update (TRL / DeepSeek-style GRPO; the
        official GRPO of Razin et al. subtracts a detached k3 term instead,
        docs/theory.md#official-rloo-and-grpo-semantics).
      clip_eps: PPO clip range of the ratio, ``[1 - eps, 1 + eps]``; > 0.
      ratio_level: ``sequence`` (one ratio per response, the official RLOO) or ``token``.
      aggregation: how a token-level loss is reduced (:data:`jaxrm.pg.AGGREGATIONS`); with
        ``ratio_level="sequence"`` the surrogate is a mean over sequences whatever this says.
      entropy_coef: weight of an entropy bonus (0: none).
      epochs: passes over each rollout batch.
      minibatches: optimizer steps per pass; must divide ``prompts_per_iteration x k``. Each
        pass shuffles all the responses, so a prompt's k samples can land in different
        minibatches (as in the official trainer); their advantages are computed before.
      microbatches: gradient accumulation: each optimizer step's gradient is summed over this
        many microbatches of its minibatch, computed one after another (a ``lax.scan``), so an
        update holds one microbatch's activations. The same step up to float rounding: each
        microbatch's loss terms are weighted by its share of the tokens or sequences that the
        term's aggregation divides by; gradients accumulate in at least float32. The forward
        passes over the rollout (the reference's log-probs, the policy's when recomputed, the
        teacher) also run one microbatch of rows at a time (:func:`by_microbatches`,
        ``minibatches x microbatches`` parts). Must divide the minibatch
        (``prompts_per_iteration x k / minibatches``). On the development CPU, 8 microbatches of
        16 responses (``pythia-10m``) took the update's temporaries from 1.2 GiB to 0.16 GiB and
        made it and the forward passes faster (docs/performance.md).
      learning_rate: Adam learning rate (> 0).
      adam_eps: Adam's epsilon (> 0).
      max_grad_norm: clip the global gradient norm to this (> 0), or None for no clipping.
      reward_clip: clip normalised rewards to ``[-reward_clip, reward_clip]``, or None.
      reward_normalization: a name of :data:`jaxrm.pg.REWARD_NORMALIZATIONS`: ``std``
        (``(r - mean) / (std + 1e-8)``, std with ddof 0) or ``rsqrt_var``
        (``(r - mean) * rsqrt(var + 1e-8)``, var with ddof 1, the official RLOO); the statistics
        are measured once by :func:`measure_reward_statistics` with the matching ddof.
    """

    advantage_estimator: str = checked("rloo", one_of(pg.ADVANTAGE_ESTIMATORS))
    samples_per_prompt: int = checked(2, POSITIVE_INT)
    prompts_per_iteration: int = checked(32, POSITIVE_INT)
    max_new_tokens: int = checked(64, POSITIVE_INT)
    temperature: float = checked(1.0, (lambda v: v >= MIN_TEMPERATURE, f">= {MIN_TEMPERATURE:g}"))
    top_k: int = checked(0, NON_NEGATIVE)
    top_p: float = checked(1.0, (lambda v: 0 < v <= 1, "in (0, 1]"))
    eos_id: int | None = checked(None, NON_NEGATIVE)
    pad_id: int = checked(0, NON_NEGATIVE)
    cache_phases: int = checked(4, POSITIVE_INT)
    kl_coef: float = checked(0.05, NON_NEGATIVE)
    kl_estimator: str = checked("k1", one_of(metrics.KL_ESTIMATORS))
    kl_placement: str = checked("reward", one_of(KL_PLACEMENTS))
    clip_eps: float = checked(0.2, POSITIVE)
    ratio_level: str = checked("sequence", one_of(pg.RATIO_LEVELS))
    aggregation: str = checked("token-mean", one_of(pg.AGGREGATIONS))
    entropy_coef: float = checked(0.0, NON_NEGATIVE)
    epochs: int = checked(1, POSITIVE_INT)
    minibatches: int = checked(1, POSITIVE_INT)
    microbatches: int = checked(1, POSITIVE_INT)
    learning_rate: float = checked(1e-6, POSITIVE)
    adam_eps: float = checked(1e-8, POSITIVE)
    max_grad_norm: float | None = checked(1.0, POSITIVE)
    reward_clip: float | None = checked(None, POSITIVE)
    reward_normalization: str = checked("std", one_of(pg.REWARD_NORMALIZATIONS))

    @classmethod
    def official_rloo(cls, **overrides) -> RLHFConfig:
        """The official RLOO run's hyperparameters and normalisation, each field's source in
        docs/theory.md#rlhfconfigofficial_rloo; ``overrides`` replace fields (for example
        ``eos_id`` and ``pad_id``, which depend on the tokenizer).

        >>> config = RLHFConfig.official_rloo()
        >>> config.minibatches, config.learning_rate, config.reward_normalization
        (2, 1e-07, 'rsqrt_var')
        """
        official = dict(
            advantage_estimator="rloo",
            samples_per_prompt=2,
            prompts_per_iteration=32,
            max_new_tokens=512,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            kl_coef=0.05,
            kl_estimator="k1",
            kl_placement="reward",
            clip_eps=0.2,
            ratio_level="sequence",
            entropy_coef=0.0,
            epochs=1,
            minibatches=2,
            learning_rate=1e-7,
            adam_eps=1e-8,
            max_grad_norm=None,
            reward_clip=None,
            reward_normalization="rsqrt_var",
        )
        return cls(**{**official, **overrides})

    def __post_init__(self):
        check_fields(self)
        if self.advantage_estimator != "reinforce" and self.samples_per_prompt < 2:
            raise ValueError(
                f"advantage_estimator={self.advantage_estimator!r} needs samples_per_prompt >= 2 "
                "(a baseline from the group)."
            )
        if (self.prompts_per_iteration * self.samples_per_prompt) % self.minibatches:
            raise ValueError(
                f"minibatches={self.minibatches} must divide prompts_per_iteration x samples_per_prompt = "
                f"{self.prompts_per_iteration * self.samples_per_prompt}."
            )
        minibatch = self.prompts_per_iteration * self.samples_per_prompt // self.minibatches
        if minibatch % self.microbatches:
            raise ValueError(
                f"microbatches={self.microbatches} must divide the minibatch of {minibatch} responses "
                "(prompts_per_iteration x samples_per_prompt / minibatches)."
            )

    @property
    def sampling(self) -> SamplingOptions:
        return SamplingOptions(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            cache_phases=self.cache_phases,
        )

    @property
    def microbatches_per_rollout(self) -> int:
        """The parts (``minibatches x microbatches``) in which a forward pass over a rollout
        batch runs, one at a time (:func:`by_microbatches`)."""
        return self.minibatches * self.microbatches

    @property
    def reward_ddof(self) -> int:
        """The ddof of the reward statistics that ``reward_normalization`` expects."""
        return 1 if self.reward_normalization == "rsqrt_var" else 0

    def optimizer(self) -> optax.GradientTransformation:
        """Adam after global-norm clipping (``max_grad_norm``), run on the parameters stacked by
        layer role (:func:`jaxrm.train.optimizers.stack_layers`: the same updates, as a few
        operations whatever the depth)."""
        adam = optax.adam(self.learning_rate, eps=self.adam_eps)
        optimizer = (
            adam if self.max_grad_norm is None else optax.chain(optax.clip_by_global_norm(self.max_grad_norm), adam)
        )
        return stack_layers(optimizer)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@flax.struct.dataclass
class TrainState:
    """Everything that changes during a run: enough to continue it exactly.

    Attributes:
      params: the policy's ``nnx.Param`` state.
      opt_state: the optax state of :meth:`RLHFConfig.optimizer`.
      step: iterations done; iteration ``t`` draws from ``fold_in(key, t)``.
      key: the run's random key.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


@flax.struct.dataclass
class TrainData:
    """What an iteration reads but never changes.

    Attributes:
      prompts: ``[num_prompts, prompt_len]`` left-padded token ids, visited in order and wrapped
        around (the official trainer reshuffles them every epoch).
      prompt_mask: their boolean mask.
      ref_params: the frozen reference policy's parameters.
      reward_params: the teacher's parameters (None for a function).
      reward_mean: the fixed normalisation's mean.
      reward_std: the fixed normalisation's standard deviation (see
        :attr:`RLHFConfig.reward_normalization`).
    """

    prompts: jax.Array
    prompt_mask: jax.Array
    ref_params: Any
    reward_params: Any
    reward_mean: jax.Array
    reward_std: jax.Array


def reward_model_fn(graphdef: nnx.GraphDef) -> RewardFn:
    """A teacher from a reward model: the score of prompt + response at its last real token."""

    def score(params, prompt, prompt_mask, response, response_mask):
        model: RewardModel = nnx.merge(graphdef, params)
        tokens = jnp.concatenate([prompt, response], axis=1)
        return model(tokens, jnp.concatenate([prompt_mask, response_mask], axis=1))

    return score


def policy_log_probs(graphdef, params, prompt, prompt_mask, response, response_mask, *, temperature):
    """Per-token log-probs ``[batch, time]`` of ``response`` and the logits that produced them."""
    model: CausalLM = nnx.merge(graphdef, params)
    tokens = jnp.concatenate([prompt, response], axis=1)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
    logits = model.head(model.trunk(tokens, mask)[:, prompt.shape[1] - 1 : -1]) / temperature
    return jnp.where(response_mask, token_log_probs(logits, response), 0.0), logits


class IterationPhases(NamedTuple):
    """The pure phases of one RLHF iteration, as :func:`make_iteration` composes them.

    Attributes:
      sample: ``sample(params, prompt, prompt_mask, key) -> Samples``, the KV-cache sampler.
      log_probs: ``log_probs(params, prompt, prompt_mask, response, response_mask) -> logp``,
        the per-token log-probs of a forward pass of the policy (or of the reference, with its
        parameters), one microbatch of rows at a time (:func:`by_microbatches`).
      optimize: ``optimize(params, opt_state, rollout, key) -> ((params, opt_state), stats)``:
        every epoch and minibatch update on ``rollout = (prompt, prompt_mask, response,
        response_mask, old_logp, ref_logp, advantages)``.
    """

    sample: Callable
    log_probs: Callable
    optimize: Callable


class LossShares(NamedTuple):
    """What one microbatch's loss terms weigh in its minibatch's loss: the microbatch's share of
    what each term's aggregation divides by (all 1 for a whole minibatch).

    Attributes:
      surrogate: the clipped surrogate's share (of the tokens with ``ratio_level="token"`` under
        ``token-mean``; else of the non-empty sequences, which the sequence aggregations and
        sequence-level ratios average over).
      kl: the loss's KL term's share (tokens under ``token-mean``, else non-empty sequences).
      tokens: the share of response tokens (the entropy, a token mean).
      clip: the clip fraction's share (non-empty sequences or tokens, as the ratios are counted).
    """

    surrogate: Any
    kl: Any
    tokens: Any
    clip: Any


WHOLE_MINIBATCH = LossShares(1.0, 1.0, 1.0, 1.0)


def microbatch_shares(response_mask: jax.Array, config: RLHFConfig) -> LossShares:
    """The :class:`LossShares` of each microbatch of ``response_mask [microbatches, rows, time]``;
    summed over microbatches, their weighted losses make the minibatch's loss (up to rounding).

    >>> mask = jnp.array([[[True, True], [True, True]], [[True, False], [True, False]]])
    >>> shares = microbatch_shares(mask, RLHFConfig(ratio_level="token", prompts_per_iteration=2))
    >>> [round(float(x), 3) for x in shares.tokens], [round(float(x), 3) for x in shares.clip]
    ([0.667, 0.333], [0.667, 0.333])
    >>> [float(x) for x in microbatch_shares(mask, RLHFConfig(prompts_per_iteration=2)).surrogate]
    [0.5, 0.5]
    """

    def share(counts):
        counts = counts.astype(jnp.float32)
        return counts / jnp.maximum(jnp.sum(counts), 1.0)

    response_mask = response_mask.astype(bool)
    tokens = share(jnp.sum(response_mask, axis=(1, 2)))
    sequences = share(jnp.sum(jnp.any(response_mask, axis=-1), axis=-1))
    by_aggregation = tokens if config.aggregation == "token-mean" else sequences
    if config.ratio_level == "sequence":
        return LossShares(surrogate=sequences, kl=by_aggregation, tokens=tokens, clip=sequences)
    return LossShares(surrogate=by_aggregation, kl=by_aggregation, tokens=tokens, clip=tokens)


def _split_rows(tree, parts: int):
    """``[rows, ...]`` arrays as ``[parts, rows / parts, ...]``, part ``c`` holding rows ``c, c +
    parts, c + 2 parts, ...``: strided, so that a batch split over a mesh's data axis keeps each
    device's rows on it when ``parts`` divides them."""
    return jax.tree.map(lambda a: jnp.swapaxes(a.reshape(-1, parts, *a.shape[1:]), 0, 1), tree)


def _join_rows(tree):
    """The inverse of :func:`_split_rows`."""
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1).reshape(-1, *a.shape[2:]), tree)


def by_microbatches(fn: Callable, parts: int) -> Callable:
    """``fn(params, *rows)`` computed on ``parts`` strided parts of the rows one after another
    (``lax.map``), so that only one part's activations are in memory; ``parts=1`` returns ``fn``.

    ``fn`` must treat its rows independently and return per-row outputs (leading axis ``rows``),
    as a teacher and a log-prob pass do; the outputs come back in row order.

    >>> rows_seen = by_microbatches(lambda params, x: jnp.full(x.shape[0], x.shape[0]), 4)
    >>> rows_seen(None, jnp.arange(8)).tolist()
    [2, 2, 2, 2, 2, 2, 2, 2]
    """
    check_int("parts", parts, low=1)
    if parts == 1:
        return fn

    def chunked(params, *rows):
        if rows[0].shape[0] % parts:
            raise ValueError(f"parts={parts} must divide the {rows[0].shape[0]} rows.")
        return _join_rows(jax.lax.map(lambda part: fn(params, *part), _split_rows(rows, parts)))

    return chunked


def make_phases(config: RLHFConfig, policy_graphdef: nnx.GraphDef, *, batch_sharding=None) -> IterationPhases:
    """The phases of :func:`make_iteration` (less the teacher), to compose or time one by one.

    ``batch_sharding`` (as in :func:`make_iteration`) keeps every minibatch's rows split over the
    mesh's data axis, so that each device takes the forward and backward passes of its own rows
    (XLA then sums the gradients across devices). Without it XLA may gather a shuffled minibatch
    onto every device and repeat the whole update there.
    """
    optimizer = config.optimizer()
    batch = config.samples_per_prompt * config.prompts_per_iteration
    rows_per_minibatch = batch // config.minibatches

    def split_over_devices(minibatches):
        """``[minibatches, rows, ...]`` arrays with their rows split along the batch's data axis."""
        if batch_sharding is None or rows_per_minibatch % batch_sharding.num_devices:
            return minibatches
        sharding = jax.sharding.NamedSharding(
            batch_sharding.mesh, jax.sharding.PartitionSpec(None, *batch_sharding.spec)
        )
        return jax.lax.with_sharding_constraint(minibatches, sharding)

    def forward(params, prompt, prompt_mask, response, response_mask):
        return policy_log_probs(
            policy_graphdef, params, prompt, prompt_mask, response, response_mask, temperature=config.temperature
        )

    def log_probs(params, prompt, prompt_mask, response, response_mask):
        return forward(params, prompt, prompt_mask, response, response_mask)[0]

    def loss_fn(params, minibatch, *, shares: LossShares = WHOLE_MINIBATCH):
        prompt, prompt_mask, response, response_mask, old_logp, ref_logp, advantages = minibatch
        logp, logits = forward(params, prompt, prompt_mask, response, response_mask)
        loss, clip_fraction = pg.clipped_surrogate_loss(
            logp,
            old_logp,
            advantages,
            response_mask,
            clip_eps=config.clip_eps,
            ratio_level=config.ratio_level,
            aggregation=config.aggregation,
        )
        loss = shares.surrogate * loss
        if config.entropy_coef == 0:  # measured only: no backward pass through the softmax entropy
            logits = jax.lax.stop_gradient(logits)
        entropy = shares.tokens * pg.aggregate(pg.entropy_per_token(logits, response_mask), response_mask)
        if config.kl_placement == "loss":
            kl = pg.kl_per_token(logp, ref_logp, response_mask, kl_estimator=config.kl_estimator)
            loss = loss + shares.kl * config.kl_coef * pg.aggregate(kl, response_mask, aggregation=config.aggregation)
        if config.entropy_coef != 0:
            loss = loss - config.entropy_coef * entropy
        return loss, {"clip_fraction": shares.clip * clip_fraction, "entropy": entropy}

    def gradient(params, minibatch):
        """``((loss, stats), grads)`` of one minibatch, accumulated over ``config.microbatches``."""
        value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
        if config.microbatches == 1:
            return value_and_grad(params, minibatch)
        microbatches = _split_rows(minibatch, config.microbatches)
        _, _, _, response_mask, *_ = microbatches
        all_shares = microbatch_shares(response_mask, config)

        def accumulate(total, microbatch_and_shares):
            microbatch, shares = microbatch_and_shares
            return jax.tree.map(jnp.add, total, value_and_grad(params, microbatch, shares=shares)), None

        first = jax.tree.map(lambda a: a[0], (microbatches, all_shares))
        result_shapes = jax.eval_shape(lambda m, s: value_and_grad(params, m, shares=s), *first)
        # Sums in at least float32, so that bfloat16 parameters do not round every partial sum.
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.promote_types(a.dtype, jnp.float32)), result_shapes)
        total, _ = jax.lax.scan(accumulate, zeros, (microbatches, all_shares))
        return jax.tree.map(lambda a, like: a.astype(like.dtype), total, result_shapes)

    def update(carry, minibatch):
        params, opt_state = carry
        (loss, aux), grads = gradient(params, minibatch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss, **aux}

    def optimize(params, opt_state, rollout, key):
        def one_epoch(carry, epoch_key):
            order = jax.random.permutation(epoch_key, batch) if config.minibatches > 1 else jnp.arange(batch)
            minibatches = jax.tree.map(lambda a: a[order].reshape(config.minibatches, -1, *a.shape[1:]), rollout)
            return jax.lax.scan(update, carry, split_over_devices(minibatches))

        return jax.lax.scan(one_epoch, (params, opt_state), jax.random.split(key, config.epochs))

    return IterationPhases(
        make_sampler(policy_graphdef, config.sampling),
        by_microbatches(log_probs, config.microbatches_per_rollout),
        optimize,
    )


def make_iteration(
    config: RLHFConfig,
    policy_graphdef: nnx.GraphDef,
    reward_fn: RewardFn,
    *,
    ground_truth_fn: RewardFn | None = None,
    batch_sharding=None,
):
    """The pure ``iteration(state, data) -> (state, metrics)`` of one RLHF step.

    ``reward_fn(data.reward_params, prompt, prompt_mask, response, response_mask)`` is the
    teacher (called on ``config.microbatches_per_rollout`` parts of the rows in turn);
    ``ground_truth_fn`` (same signature, called with ``None`` params), when given, is only
    measured: ground-truth reward and the teacher's on-policy accuracy against it.
    ``batch_sharding``: a sharding for ``[batch, ...]`` arrays (prompts split along a ``data``
    mesh axis, the ``k`` samples of a prompt kept together); None leaves placement to XLA.
    The phases (:func:`make_phases`) are sampling, the reference's (and, with top-k/top-p, the
    policy's) log-probs, the teacher, and the updates.
    """
    sampler, log_probs, optimize = make_phases(config, policy_graphdef, batch_sharding=batch_sharding)
    teacher = by_microbatches(reward_fn, config.microbatches_per_rollout)
    k, num_prompts = config.samples_per_prompt, config.prompts_per_iteration
    batch = k * num_prompts
    filtered = config.top_k > 0 or config.top_p < 1

    def iteration(state: TrainState, data: TrainData):
        key = jax.random.fold_in(state.key, state.step)
        sample_key, shuffle_key = jax.random.split(key)
        start = (state.step * num_prompts) % data.prompts.shape[0]
        index = (start + jnp.arange(num_prompts)) % data.prompts.shape[0]
        prompt = jnp.repeat(data.prompts[index], k, axis=0)  # [batch, P], the k samples of a prompt adjacent
        prompt_mask = jnp.repeat(data.prompt_mask[index], k, axis=0).astype(bool)
        if batch_sharding is not None:
            prompt, prompt_mask = jax.lax.with_sharding_constraint((prompt, prompt_mask), batch_sharding)

        samples = sampler(state.params, prompt, prompt_mask, sample_key)
        response, response_mask = samples.tokens, samples.mask
        if filtered:
            old_logp = log_probs(state.params, prompt, prompt_mask, response, response_mask)
        else:
            old_logp = samples.log_probs
        ref_logp = log_probs(data.ref_params, prompt, prompt_mask, response, response_mask)
        old_logp, ref_logp = jax.lax.stop_gradient(old_logp), jax.lax.stop_gradient(ref_logp)

        raw = teacher(data.reward_params, prompt, prompt_mask, response, response_mask).reshape(num_prompts, k)
        rewards = pg.normalize_sampled_rewards(
            raw, data.reward_mean, data.reward_std, normalization=config.reward_normalization, clip=config.reward_clip
        )
        kl_sequence = jnp.sum(pg.kl_per_token(old_logp, ref_logp, response_mask), axis=-1).reshape(num_prompts, k)
        if config.kl_placement == "reward":
            per_prompt = [a.reshape(num_prompts, k, -1) for a in (old_logp, ref_logp, response_mask)]
            rewards = pg.kl_penalized_rewards(
                rewards, *per_prompt, kl_coef=config.kl_coef, kl_estimator=config.kl_estimator
            )
        advantages = pg.ADVANTAGE_ESTIMATORS[config.advantage_estimator](rewards).reshape(batch)

        rollout = (prompt, prompt_mask, response, response_mask, old_logp, ref_logp, advantages)
        (params, opt_state), stats = optimize(state.params, state.opt_state, rollout, shuffle_key)
        out = {
            "proxy_reward": jnp.mean(raw),
            "reward_variance": jnp.mean(metrics.sample_reward_variance(raw)) if k > 1 else jnp.nan,
            "kl": jnp.mean(kl_sequence),
            "response_length": jnp.mean(jnp.sum(response_mask, axis=-1)),
            "loss": jnp.mean(stats["loss"]),
            "entropy": jnp.mean(stats["entropy"]),
            "clip_fraction": jnp.mean(stats["clip_fraction"]),
        }
        if ground_truth_fn is not None:
            truth = ground_truth_fn(None, prompt, prompt_mask, response, response_mask).reshape(num_prompts, k)
            out["ground_truth_reward"] = jnp.mean(truth)
            out["on_policy_accuracy"] = jnp.mean(metrics.accuracy(raw, truth)) if k > 1 else jnp.nan
        return TrainState(params, opt_state, state.step + 1, state.key), out

    return iteration


def init_state(policy: CausalLM, config: RLHFConfig, key) -> TrainState:
    """The state of a run that starts from ``policy`` (its parameters are copied, not donated).

    Refuses (``ValueError``) an ``eos_id`` or ``pad_id`` outside the policy's vocabulary, and a
    ``key`` that is not a JAX key."""
    check_instance("policy", policy, CausalLM)
    check_instance("config", config, RLHFConfig)
    check_key("key", key)
    config.sampling.check_vocabulary(policy.config.vocab_size)
    params = nnx.state(policy, nnx.Param)
    return TrainState(params, config.optimizer().init(params), jnp.zeros((), jnp.int32), key)


def make_train(
    config: RLHFConfig,
    policy_graphdef: nnx.GraphDef,
    reward_fn: RewardFn,
    num_iterations: int,
    *,
    ground_truth_fn: RewardFn | None = None,
    batch_sharding=None,
    on_iteration: Callable[[jax.Array], None] | None = None,
):
    """A pure ``train(state, data) -> (state, metrics)`` running ``num_iterations`` under ``lax.scan``.

    Metrics come back stacked, ``[num_iterations]`` each. ``jax.vmap`` over states with different
    keys runs several seeds in one program; over ``data.reward_params`` / ``reward_mean`` /
    ``reward_std`` too, several teachers. ``on_iteration(step)``, when given, is called on the host
    after every iteration (once per vmapped element) through ``jax.debug.callback``: progress
    output from inside a compiled chunk. Other arguments as in :func:`make_iteration`.
    """
    iteration = make_iteration(
        config, policy_graphdef, reward_fn, ground_truth_fn=ground_truth_fn, batch_sharding=batch_sharding
    )

    def train(state: TrainState, data: TrainData):
        def one(state, _):
            state, out = iteration(state, data)
            if on_iteration is not None:
                jax.debug.callback(on_iteration, state.step)
            return state, out

        return jax.lax.scan(one, state, None, length=num_iterations)

    return train


def measure_reward_statistics(
    policy: CausalLM,
    reward_fn: RewardFn,
    reward_params,
    prompts,
    prompt_mask,
    key,
    *,
    config: RLHFConfig,
    samples: int = 10,
):
    """``(mean, std)`` of the teacher's rewards over ``samples`` responses per prompt of ``policy``.

    The paper's normalisation (docs/theory.md#experiments-of-razin-et-al: 500 prompts x 10
    samples of the initial policy); ``std`` with the ddof that ``config.reward_normalization``
    expects (:attr:`RLHFConfig.reward_ddof`). ``prompts`` are left-padded, as for :func:`run_rlhf`.
    """
    check_prompts(prompts, prompt_mask, policy.config.vocab_size)
    check_int("samples", samples, low=1)
    check_key("key", key)
    config.sampling.check_vocabulary(policy.config.vocab_size)
    graphdef, params = nnx.split(policy)
    sampler = jax.jit(make_sampler(graphdef, config.sampling))
    score = jax.jit(reward_fn)
    rewards = []
    for draw in range(samples):
        out = sampler(params, prompts, prompt_mask, jax.random.fold_in(key, draw))
        rewards.append(score(reward_params, prompts, prompt_mask, out.tokens, out.mask))
    mean, std = pg.reward_statistics(jnp.stack(rewards), ddof=config.reward_ddof)
    if float(std) == 0:
        warnings.warn(
            "the teacher gave every sampled response the same reward (std 0): run_rlhf refuses these statistics, "
            "since a later difference of rewards would be divided by eps alone. Is the reward model trained? "
            "Measure on more samples, or pass std 1 to only center the rewards."
        )
    return mean, std
