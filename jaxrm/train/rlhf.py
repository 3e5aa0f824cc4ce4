"""RLHF for transformer policies: RLOO / GRPO / REINFORCE iterations as one pure, compiled step.

One iteration (THEORY.md §4, the official RLOO semantics by default):

1. take the next ``prompts_per_iteration`` prompts and draw ``k`` responses each with the KV-cache
   sampler;
2. score them with the teacher (a :class:`~jaxrm.models.RewardModel` or any jittable
   ground-truth function), normalise with a fixed mean/std measured once on the initial policy;
3. per-token log-probs of the policy (at sampling time) and of the frozen reference;
4. fold ``kl_coef * sum_t KL_t`` into the reward (or add it to the loss), compute advantages
   (leave-one-out, group-normalised, or plain);
5. ``epochs`` passes of ``minibatches`` optax updates on the clipped surrogate.

``make_iteration(...)`` returns the pure ``iteration(state, data) -> (state, metrics)``;
``make_train(...)`` scans it for a whole run (``vmap`` it over seeds). :func:`train` drives
chunks of iterations from Python for progress, ``metrics.jsonl`` and checkpoints.

Log-probs for training (new, old and reference) use ``logits / temperature``; top-k/top-p only
shape which tokens are drawn (as TRL does).

Metrics of an iteration (means over its ``prompts_per_iteration x k`` responses):
``proxy_reward`` (the teacher's raw score), ``reward_variance`` (per prompt over its k samples,
``ddof=1``, averaged), ``kl`` (``sum_t log pi - log pi_ref``, the unbiased k1 estimate of the
sequence KL: it can dip below 0 near the reference), ``entropy`` (per-token, of the tempered
policy), ``clip_fraction``, ``loss``, ``response_length``; with a ground-truth function also
``ground_truth_reward`` and ``on_policy_accuracy`` (the teacher against the ground truth over
the pairs of each prompt's samples, a tie agreeing only with a tie).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxrm import metrics, pg
from jaxrm._checks import check_choice
from jaxrm.models.sampling import SamplingOptions, make_sampler, token_log_probs
from jaxrm.models.transformer import CausalLM, RewardModel

ALGORITHMS = tuple(pg.ADVANTAGES)
KL_PLACEMENTS = ("reward", "loss")

# A teacher maps (prompt, prompt_mask, response, response_mask) -> rewards [batch]; ``params`` is
# the reward model's state (or None for a ground-truth function).
RewardFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class RLHFConfig:
    """Hyperparameters of an RLHF run. Defaults: the official RLOO of THEORY.md §4.

    ``algorithm`` picks the advantages: ``rloo`` (leave-one-out), ``grpo`` (group mean/std, std
    with ``ddof=1``), ``dr_grpo`` (group mean only), ``reinforce`` (no baseline).
    ``kl_placement="reward"`` folds ``kl_coef * sum_t KL_t`` into each sequence's reward before the
    advantages; ``"loss"`` adds ``kl_coef * aggregate(KL_t)`` to the loss (GRPO, with ``k3``).
    """

    algorithm: str = "rloo"
    samples_per_prompt: int = 2
    prompts_per_iteration: int = 32
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_id: int | None = None
    pad_id: int = 0
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    kl_placement: str = "reward"
    clip_eps: float = 0.2
    ratio_level: str = "sequence"
    aggregation: str = "token-mean"
    entropy_coef: float = 0.0
    epochs: int = 1
    minibatches: int = 1
    learning_rate: float = 1e-6
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    reward_clip: float | None = None

    def __post_init__(self):
        check_choice("algorithm", self.algorithm, ALGORITHMS)
        check_choice("kl_placement", self.kl_placement, KL_PLACEMENTS)
        check_choice("kl_estimator", self.kl_estimator, ("k1", "k2", "k3"))
        check_choice("ratio_level", self.ratio_level, pg.RATIO_LEVELS)
        check_choice("aggregation", self.aggregation, pg.AGGREGATIONS)
        for name in ("samples_per_prompt", "prompts_per_iteration", "max_new_tokens", "epochs", "minibatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RLHFConfig.{name} must be a positive int, got {value!r}.")
        if self.algorithm != "reinforce" and self.samples_per_prompt < 2:
            raise ValueError(f"algorithm={self.algorithm!r} needs samples_per_prompt >= 2 (a baseline from the group).")
        if (self.prompts_per_iteration * self.samples_per_prompt) % self.minibatches:
            raise ValueError(
                f"minibatches={self.minibatches} must divide prompts_per_iteration x samples_per_prompt = "
                f"{self.prompts_per_iteration * self.samples_per_prompt}."
            )
        for name in ("kl_coef", "clip_eps", "entropy_coef", "temperature"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"RLHFConfig.{name} must be >= 0, got {getattr(self, name)!r}.")
        if self.temperature == 0:
            raise ValueError("RLHFConfig.temperature must be > 0: policy gradients need a stochastic policy.")
        if not (self.learning_rate > 0 and self.max_grad_norm > 0 and self.adam_eps > 0):
            raise ValueError("RLHFConfig.learning_rate, adam_eps and max_grad_norm must be > 0.")

    @property
    def sampling(self) -> SamplingOptions:
        return SamplingOptions(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
        )

    def optimizer(self) -> optax.GradientTransformation:
        return optax.chain(
            optax.clip_by_global_norm(self.max_grad_norm), optax.adam(self.learning_rate, eps=self.adam_eps)
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@flax.struct.dataclass
class TrainState:
    """Everything that changes during a run: enough to continue it exactly."""

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


@flax.struct.dataclass
class TrainData:
    """What an iteration reads but never changes.

    ``prompts``/``prompt_mask``: ``[num_prompts, prompt_len]`` left-padded, visited in order and
    wrapped around; ``ref_params``: the frozen reference policy; ``reward_params``: the teacher's
    parameters (None for a function); ``reward_mean``/``reward_std``: the fixed normalisation.
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
    logits = model(tokens, mask)[:, prompt.shape[1] - 1 : -1] / temperature
    return jnp.where(response_mask, token_log_probs(logits, response), 0.0), logits


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
    teacher; ``ground_truth_fn`` (same signature, called with ``None`` params), when given, is
    only measured: ground-truth reward and the teacher's on-policy accuracy against it.
    ``batch_sharding``: a sharding for ``[batch, ...]`` arrays (prompts split along a ``data``
    mesh axis, the ``k`` samples of a prompt kept together); None leaves placement to XLA.
    """
    sampler = make_sampler(policy_graphdef, config.sampling)
    optimizer = config.optimizer()
    k, num_prompts = config.samples_per_prompt, config.prompts_per_iteration
    batch = k * num_prompts
    filtered = config.top_k > 0 or config.top_p < 1

    def log_probs(params, prompt, prompt_mask, response, response_mask):
        return policy_log_probs(
            policy_graphdef, params, prompt, prompt_mask, response, response_mask, temperature=config.temperature
        )

    def loss_fn(params, minibatch):
        prompt, prompt_mask, response, response_mask, old_logp, ref_logp, advantages = minibatch
        logp, logits = log_probs(params, prompt, prompt_mask, response, response_mask)
        loss, clip_fraction = pg.clipped_surrogate_loss(
            logp,
            old_logp,
            advantages,
            response_mask,
            clip_eps=config.clip_eps,
            ratio_level=config.ratio_level,
            aggregation=config.aggregation,
        )
        entropy = pg.aggregate(pg.entropy_per_token(logits, response_mask), response_mask)
        if config.kl_placement == "loss":
            kl = pg.kl_per_token(logp, ref_logp, response_mask, estimator=config.kl_estimator)
            loss = loss + config.kl_coef * pg.aggregate(kl, response_mask, mode=config.aggregation)
        loss = loss - config.entropy_coef * entropy
        return loss, {"clip_fraction": clip_fraction, "entropy": entropy}

    def update(carry, minibatch):
        params, opt_state = carry
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, minibatch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss, **aux}

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
            old_logp, _ = log_probs(state.params, prompt, prompt_mask, response, response_mask)
        else:
            old_logp = samples.log_probs
        ref_logp, _ = log_probs(data.ref_params, prompt, prompt_mask, response, response_mask)
        old_logp, ref_logp = jax.lax.stop_gradient(old_logp), jax.lax.stop_gradient(ref_logp)

        raw = reward_fn(data.reward_params, prompt, prompt_mask, response, response_mask).reshape(num_prompts, k)
        rewards = pg.normalize_sampled_rewards(raw, data.reward_mean, data.reward_std, clip=config.reward_clip)
        kl_sequence = jnp.sum(pg.kl_per_token(old_logp, ref_logp, response_mask), axis=-1).reshape(num_prompts, k)
        if config.kl_placement == "reward":
            per_prompt = [a.reshape(num_prompts, k, -1) for a in (old_logp, ref_logp, response_mask)]
            rewards = pg.kl_penalized_rewards(
                rewards, *per_prompt, kl_coef=config.kl_coef, estimator=config.kl_estimator
            )
        advantages = pg.ADVANTAGES[config.algorithm](rewards).reshape(batch)

        everything = (prompt, prompt_mask, response, response_mask, old_logp, ref_logp, advantages)

        def one_epoch(carry, epoch_key):
            order = jax.random.permutation(epoch_key, batch) if config.minibatches > 1 else jnp.arange(batch)
            minibatches = jax.tree.map(lambda a: a[order].reshape(config.minibatches, -1, *a.shape[1:]), everything)
            return jax.lax.scan(update, carry, minibatches)

        (params, opt_state), stats = jax.lax.scan(
            one_epoch, (state.params, state.opt_state), jax.random.split(shuffle_key, config.epochs)
        )
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

    return iteration, optimizer


def init_state(policy: CausalLM, config: RLHFConfig, key) -> TrainState:
    """The state of a run that starts from ``policy`` (its parameters are copied, not donated)."""
    params = nnx.state(policy, nnx.Param)
    return TrainState(params, config.optimizer().init(params), jnp.zeros((), jnp.int32), key)


def make_train(config: RLHFConfig, policy_graphdef, reward_fn, num_iterations: int, *, ground_truth_fn=None):
    """A pure ``train(state, data) -> (state, metrics)`` running ``num_iterations`` under ``lax.scan``.

    Metrics come back stacked, ``[num_iterations]`` each. ``jax.vmap`` over states with different
    keys (and parameters) runs several seeds in one program.
    """
    iteration, _ = make_iteration(config, policy_graphdef, reward_fn, ground_truth_fn=ground_truth_fn)

    def train(state: TrainState, data: TrainData):
        return jax.lax.scan(lambda s, _: iteration(s, data), state, None, length=num_iterations)

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

    The paper's normalisation (THEORY.md §4: 500 prompts x 10 samples of the initial policy).
    """
    graphdef, params = nnx.split(policy)
    sampler = jax.jit(make_sampler(graphdef, config.sampling))
    score = jax.jit(reward_fn)
    rewards = []
    for draw in range(samples):
        out = sampler(params, prompts, prompt_mask, jax.random.fold_in(key, draw))
        rewards.append(score(reward_params, prompts, prompt_mask, out.tokens, out.mask))
    return pg.reward_statistics(jnp.stack(rewards))
