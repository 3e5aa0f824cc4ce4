"""The accuracy paradox in exact form (Chen et al. 2024; Razin et al. §4, Table 2).

Many prompts with a ground truth ``r_G`` that a linear reward model over fixed features cannot
represent exactly. Reward models are fitted by Bradley-Terry (with the centering term of
docs/theory.md#experiments-of-razin-et-al) on finite preference data: pairs drawn on-policy from the initial policy or
off-policy from another one, in several mixes as in Razin et al., labelled with Bradley-Terry
noise. Every run keeps checkpoints along training, as in Chen et al.; all runs train in one
``vmap``-ed ``lax.scan``. For each checkpoint (a reward model):

- on-policy accuracy (pairs weighted by the initial policy), off-policy accuracy (pairs
  weighted by the off-policy distribution), reward variance under the initial policy after one
  global normalization;
- the exact proxy and ground-truth gain, and KL, after a fixed time of gradient flow.

The Pearson/Spearman table of each property against each gain is printed beside the paper's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrm import flow, metrics
from jaxrm.studies import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    Progress,
    StudyConfig,
    checked,
    cluster_bootstrap,
    correlations,
    distinct,
    each,
    finish_study,
    fmt,
    fmt_interval,
    fmt_share,
    increasing,
    int_at_least,
    pyplot,
    save_figure,
    sign_verdict,
)

NAME = "paradox"

# Razin et al., Table 2 (Pythia-2.8B; docs/theory.md#experiments-of-razin-et-al): Pearson / Spearman
# with the reward increase after one epoch.
NAMES = {
    "variance": "reward variance",
    "on_policy_accuracy": "on-policy accuracy",
    "off_policy_accuracy": "off-policy accuracy",
}
PAPER_TABLE2 = {
    "variance": {"proxy": (0.982, 1.000), "gt": (0.834, 0.714)},
    "on_policy_accuracy": {"proxy": (-0.762, 0.143), "gt": (-0.283, 0.200)},
    "off_policy_accuracy": {"proxy": (-0.933, -0.943), "gt": (-0.507, -0.543)},
}


@dataclasses.dataclass(frozen=True)
class ParadoxConfig(StudyConfig):
    """Sizes, data and training settings of the exact accuracy-paradox study
    (docs/theory.md#the-accuracy-paradox-of-chen-et-al); the setting is described in the module
    docstring. Fields with a range are checked on construction.

    Attributes:
      seed: seed of the world (features, ``r_G``, policies); ``seed + 1`` draws the preference
        data, and the reward models' initialisations come from ``jax.random.key(seed)``.
      prompts: ``|S|`` (an int >= 1).
      num_outputs: ``|Y|`` (an int >= 3).
      features: ``d``, the dimension of the shared reward features ``phi(x, y)`` (an int >= 1).
      misspecification: standard deviation (>= 0) of the part of ``r_G``'s score outside the
        features' span: ``r_G = tanh(phi . w* + misspecification * N(0, 1))``; 0 makes ``r_G``
        representable up to the ``tanh``.
      on_policy_shares: one set of runs per share in ``[0, 1]``: the probability that a pair is
        drawn from the initial policy rather than from the off-policy distribution.
      dataset_sizes: preference pairs per run (ints >= 2); pairs of two equal outputs carry no
        weight.
      seeds: runs per (share, size), each with its own data and initialisation (an int >= 1).
      label_sharpness: ``beta > 0`` of the Bradley-Terry labels: the first output wins with
        probability ``sigmoid(beta (r_G(y1) - r_G(y2)))``.
      learning_rate: Adam learning rate of reward-model training.
      centering: coefficient of the centering term ``(r_c + r_r)^2`` in the training loss.
      init_scale: standard deviation (>= 0) of the initial free score ``b[x, y]`` of each
        output (the feature weights start at ``0.1 * N(0, 1)``).
      checkpoints: increasing optimizer-step counts (>= 0) at which each run's reward model is
        kept; the last one is the number of training steps (:attr:`steps`).
      pg_time: flow time (> 0) at which the proxy and ground-truth gains and the KL are
        measured.
    """

    seed: int = 0
    prompts: int = checked(32, POSITIVE_INT)
    num_outputs: int = checked(16, int_at_least(3))
    features: int = checked(6, POSITIVE_INT)
    misspecification: float = checked(0.7, (lambda v: v >= 0, ">= 0"))
    on_policy_shares: tuple[float, ...] = checked((1.0, 0.75, 0.5, 0.25, 0.0), distinct(each(FRACTION)))
    dataset_sizes: tuple[int, ...] = checked((64, 256, 1024), distinct(each(int_at_least(2))))
    seeds: int = checked(8, POSITIVE_INT)
    label_sharpness: float = checked(4.0, POSITIVE)
    learning_rate: float = checked(0.05, POSITIVE)
    centering: float = checked(0.01, NON_NEGATIVE)
    init_scale: float = checked(0.3, (lambda v: v >= 0, ">= 0"))
    checkpoints: tuple[int, ...] = checked((0, 1, 2, 4, 8, 16, 32, 64, 128, 256), increasing(each(NON_NEGATIVE)))
    pg_time: float = checked(16.0, POSITIVE)

    @property
    def steps(self) -> int:
        return self.checkpoints[-1]

    def quick(self) -> "ParadoxConfig":
        return dataclasses.replace(self, seeds=2, dataset_sizes=(64, 512), checkpoints=(0, 2, 8, 32, 128))


def make_world(config: ParadoxConfig):
    """Features, ground truth, initial (on-policy) and off-policy distributions."""
    rng = np.random.default_rng(config.seed)
    s, y, d = config.prompts, config.num_outputs, config.features
    features = rng.normal(size=(s, y, d)) / np.sqrt(d)
    # The part of r_G outside the features' span is what no reward model here can learn.
    gt = np.tanh(features @ rng.normal(size=d) + config.misspecification * rng.normal(size=(s, y)))
    policy_logits = rng.normal(size=(s, y))
    off_policy_logits = rng.normal(size=(s, y))
    return features, gt, policy_logits, off_policy_logits


def sample_datasets(config: ParadoxConfig, gt, policy_logits, off_policy_logits):
    """Preference pairs ``(prompt, chosen, rejected)`` for every run, padded to one size."""
    rng = np.random.default_rng(config.seed + 1)
    s, y = gt.shape
    on, off = (np.asarray(jax.nn.softmax(z, -1)) for z in (policy_logits, off_policy_logits))
    size = max(config.dataset_sizes)
    runs = []
    for share in config.on_policy_shares:
        for n in config.dataset_sizes:
            for _ in range(config.seeds):
                prompt = rng.integers(0, s, size)
                from_policy = rng.random(size) < share
                cdf = np.cumsum(np.where(from_policy[:, None], on[prompt], off[prompt]), -1)
                # Inverse-CDF draws, one per pair; min() guards the last bin against rounding.
                first, second = (np.minimum((cdf < rng.random((size, 1))).sum(-1), y - 1) for _ in range(2))
                margin = gt[prompt, first] - gt[prompt, second]
                first_wins = rng.random(size) < 1.0 / (1.0 + np.exp(-config.label_sharpness * margin))
                chosen, rejected = np.where(first_wins, first, second), np.where(first_wins, second, first)
                runs.append(
                    dict(
                        prompt=prompt,
                        chosen=chosen,
                        rejected=rejected,
                        weight=(np.arange(size) < n) & (first != second),
                        share=share,
                        size=n,
                    )
                )
    return {k: np.array([r[k] for r in runs]) for k in runs[0]}


def reward_model(params, features):
    """``r(x, y) = phi(x, y) . w + b[x, y]``: shared features plus a free score per output, so
    the pairs a run sees decide which outputs it learns to tell apart."""
    w, b = params
    return features @ w + b


def make_train(config: ParadoxConfig, features):
    """``train(data, key) -> parameters at every checkpoint``: Bradley-Terry with centering, Adam,
    from a random initial reward model (the stand-in for a head on the SFT model)."""
    optimizer = optax.adam(config.learning_rate)
    features = jnp.asarray(features)
    saved = jnp.asarray(config.checkpoints)

    def loss(params, data):
        reward = reward_model(params, features)  # [S, Y]
        chosen = reward[data["prompt"], data["chosen"]]
        rejected = reward[data["prompt"], data["rejected"]]
        per_pair = -jax.nn.log_sigmoid(chosen - rejected) + config.centering * (chosen + rejected) ** 2
        return jnp.sum(data["weight"] * per_pair) / jnp.maximum(jnp.sum(data["weight"]), 1)

    def train(data, key):
        k_w, k_b = jax.random.split(key)
        params = (
            0.1 * jax.random.normal(k_w, features.shape[-1:]),
            config.init_scale * jax.random.normal(k_b, features.shape[:-1]),
        )

        def step(carry, _):
            params, state = carry
            updates, state = optimizer.update(jax.grad(loss)(params, data), state)
            return (optax.apply_updates(params, updates), state), params

        (last, _), history = jax.lax.scan(step, (params, optimizer.init(params)), length=config.steps)
        # Parameters after 0..steps updates, at the checkpoints.
        return jax.tree.map(lambda h, end: jnp.concatenate([h, end[None]])[saved], history, last)

    return train


def run(out_dir: Path, *, quick: bool = False, config: ParadoxConfig | None = None) -> dict:
    config = ParadoxConfig.resolve(config, quick=quick)
    out_dir = Path(out_dir)
    progress = Progress(NAME)
    features, gt, policy_logits, off_logits = make_world(config)
    data = sample_datasets(config, gt, policy_logits, off_logits)
    runs = len(data["share"])
    train = jax.jit(jax.vmap(make_train(config, features)))
    keys = jax.random.split(jax.random.key(config.seed), runs)
    params = train(
        {k: jnp.asarray(data[k]) for k in ("prompt", "chosen", "rejected", "weight")}, keys
    )  # [runs, C, ...]
    models = runs * len(config.checkpoints)
    progress(f"trained {runs} Bradley-Terry runs, {models} reward models (checkpoints {list(config.checkpoints)})")

    rm = jax.vmap(jax.vmap(lambda p: reward_model(p, features)))(params).reshape(models, *gt.shape)
    logits = jnp.broadcast_to(policy_logits, rm.shape)
    gt_all = jnp.broadcast_to(gt, rm.shape)
    on_policy = np.asarray(metrics.accuracy(rm, gt_all, probs=jax.nn.softmax(logits, -1))).mean(-1)
    off_policy = np.asarray(
        metrics.accuracy(rm, gt_all, probs=jax.nn.softmax(jnp.broadcast_to(off_logits, rm.shape), -1))
    ).mean(-1)
    normalized = metrics.normalize_rewards(logits, rm)
    variance = np.asarray(metrics.reward_variance(logits, normalized)).mean(-1)
    path = flow.trajectory(logits, normalized, jnp.asarray([0.0, config.pg_time]), eval_rewards=gt_all)
    proxy_gain = np.asarray(path.rm_reward[1] - path.rm_reward[0]).mean(-1)
    gt_gain = np.asarray(path.eval_reward[1] - path.eval_reward[0]).mean(-1)
    kl = np.asarray(path.kl[1]).mean(-1)
    progress(f"exact flow to t = {config.pg_time} for every reward model")

    properties = {"variance": variance, "on_policy_accuracy": on_policy, "off_policy_accuracy": off_policy}
    gains = {"proxy": proxy_gain, "gt": gt_gain}
    shape = (runs, len(config.checkpoints))
    # As in the paper: the trained models (last checkpoint, largest datasets, every on-policy share).
    final = np.zeros(shape, bool)
    final[:, -1] = data["size"] == max(config.dataset_sizes)
    final = final.ravel()

    run_of = np.repeat(np.arange(runs), len(config.checkpoints))  # the checkpoints of a run share its data

    def table2(mask, clusters=None):
        # Over models: each gain is already the mean over the task's prompts, which every model shares.
        return {
            prop: {
                gain: correlations(
                    values[mask], g[mask], seed=config.seed, clusters=None if clusters is None else clusters[mask]
                )
                for gain, g in gains.items()
            }
            for prop, values in properties.items()
        }

    best = gt_gain.reshape(shape).argmax(-1)
    most_accurate = on_policy.reshape(shape).argmax(-1)
    picked = lambda x, index: x.reshape(shape)[np.arange(runs), index]  # noqa: E731
    summary = {
        "instances": models,
        "violations": {},
        "censored": 0,  # gains are measured at a fixed flow time: nothing is timed
        "table2": table2(final),
        "table2_models": int(final.sum()),
        "table2_all_checkpoints": table2(np.ones(models, bool), clusters=run_of),
        "paper_table2": PAPER_TABLE2,
        "accuracy_range": {
            "on_policy": [float(on_policy.min()), float(on_policy.max())],
            "off_policy": [float(off_policy.min()), float(off_policy.max())],
        },
        "chen": {
            "runs": runs,
            "best_is_not_most_accurate": float(np.mean(best != most_accurate)),
            "best_is_not_most_accurate_runs": int(np.sum(best != most_accurate)),
            "mean_accuracy_of_best": float(picked(on_policy, best).mean()),
            "mean_accuracy_of_most_accurate": float(picked(on_policy, most_accurate).mean()),
            "mean_gt_gain_of_best": float(picked(gt_gain, best).mean()),
            "mean_gt_gain_of_most_accurate": float(picked(gt_gain, most_accurate).mean()),
            "mean_variance_of_best": float(picked(variance, best).mean()),
            "mean_variance_of_most_accurate": float(picked(variance, most_accurate).mean()),
        },
        "moderate_accuracy": _moderate_accuracy(on_policy, gt_gain, run_of, seed=config.seed),
        "by_share": _by_share(config, data, shape, variance, on_policy, off_policy, gt_gain),
        "max_kl": float(kl.max()),
        "config": dataclasses.asdict(config),
    }
    t2 = summary["table2"]
    summary["table2_verdicts"] = {
        prop: sign_verdict(t2[prop]["gt"]["spearman"], PAPER_TABLE2[prop]["gt"]) for prop in t2
    }
    summary["verdict"] = (
        f"{models} reward models; trained models' Pearson / Spearman with ground-truth gain [95%], verdict from "
        "the Spearman interval: "
        + ", ".join(
            f"{NAMES[prop]} {fmt_interval(t2[prop]['gt']['pearson'])} / {fmt_interval(t2[prop]['gt']['spearman'])} "
            f"(paper {PAPER_TABLE2[prop]['gt'][0]:+.2f} / {PAPER_TABLE2[prop]['gt'][1]:+.2f}; "
            f"{summary['table2_verdicts'][prop]})"
            for prop in t2
        )
    )
    _figure(on_policy, variance, gt_gain, shape, config, out_dir / "figures" / f"{NAME}.png")
    return finish_study(out_dir, NAME, summary, _markdown(summary, config), progress=progress, quick=quick)


# Chen et al.'s moderate-accuracy optimum shows here when both gaps' 95% intervals lie above this
# (the most accurate teachers are at least a point of accuracy more accurate than the best ones,
# and teach at least 1% less), and does not when one interval lies below it; otherwise undecided.
MODERATE_GAP = 0.01


def _moderate_accuracy(on_policy, gt_gain, run_of, *, seed: int, share=0.05):
    """Do the best teachers sit below the top accuracies? Means over the top ``share`` of all
    checkpoints by gain and by accuracy, and two gaps between those sets with intervals that
    resample whole training runs: ``accuracy_gap`` (the most accurate's accuracy less the best's)
    and ``relative_gain_gap`` (how much less the most accurate teach, relative to the best)."""

    def top(index):
        k = max(1, int(share * index.size))
        accuracy, gain = on_policy[index], gt_gain[index]
        best, accurate = np.argsort(gain)[-k:], np.argsort(accuracy)[-k:]
        return accuracy[best].mean(), gain[best].mean(), accuracy[accurate].mean(), gain[accurate].mean()

    def accuracy_gap(index):
        best_accuracy, _, top_accuracy, _ = top(index)
        return top_accuracy - best_accuracy

    def relative_gain_gap(index):
        _, best_gain, _, accurate_gain = top(index)
        return (best_gain - accurate_gain) / abs(best_gain)

    accuracy_of_best, gain_of_best, accuracy_of_accurate, gain_of_accurate = top(np.arange(len(gt_gain)))
    return {
        "share": share,
        "accuracy_of_best_teachers": float(accuracy_of_best),
        "gain_of_best_teachers": float(gain_of_best),
        "accuracy_of_most_accurate": float(accuracy_of_accurate),
        "gain_of_most_accurate": float(gain_of_accurate),
        "accuracy_gap": cluster_bootstrap(accuracy_gap, run_of, seed=seed),
        "relative_gain_gap": cluster_bootstrap(relative_gain_gap, run_of, seed=seed),
    }


def _by_share(config, data, shape, variance, on_policy, off_policy, gt_gain):
    """Final checkpoints of the largest datasets, per share of on-policy pairs (Table 1's layout)."""
    last = lambda x: x.reshape(shape)[:, -1]  # noqa: E731
    out = {}
    for share in config.on_policy_shares:
        chosen = (data["share"] == share) & (data["size"] == max(config.dataset_sizes))
        out[f"{100 * share:g}%"] = {
            name: float(last(x)[chosen].mean())
            for name, x in (
                ("variance", variance),
                ("on_policy_accuracy", on_policy),
                ("off_policy_accuracy", off_policy),
                ("gt_gain", gt_gain),
            )
        }
    return out


def _figure(on_policy, variance, gt_gain, shape, config, path: Path):
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    points = left.scatter(on_policy, gt_gain, c=variance, s=8, cmap="viridis")
    fig.colorbar(points, ax=left, label="reward variance (normalized)")
    left.set(
        xlabel="on-policy accuracy",
        ylabel=f"ground-truth gain at t = {config.pg_time:g}",
        title="every checkpoint of every run",
    )
    steps = np.asarray(config.checkpoints, float)
    gains = gt_gain.reshape(shape)
    accuracy = on_policy.reshape(shape)
    right.plot(steps, gains.mean(0), "o-", color="C2", label="ground-truth gain (mean over runs)")
    right.set(xlabel="reward-model training steps", ylabel="ground-truth gain", xscale="symlog")
    twin = right.twinx()
    twin.plot(steps, accuracy.mean(0), "s--", color="C1", label="on-policy accuracy")
    twin.set_ylabel("on-policy accuracy")
    right.legend(loc="upper left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    right.set_title("along training (Chen et al.)")
    save_figure(fig, path)


def _markdown(summary: dict, config: ParadoxConfig) -> str:
    names = NAMES
    pair = lambda p: f"{p[0]:+.3f} / {p[1]:+.3f}"  # noqa: E731
    here = lambda v: f"{fmt_interval(v['pearson'])} / {fmt_interval(v['spearman'])}"  # noqa: E731
    rows = "\n".join(
        f"| {names[prop]} | {here(values['proxy'])} | {pair(PAPER_TABLE2[prop]['proxy'])} | {here(values['gt'])} | "
        f"{pair(PAPER_TABLE2[prop]['gt'])} | {summary['table2_verdicts'][prop]} | "
        f"{here(summary['table2_all_checkpoints'][prop]['gt'])} |"
        for prop, values in summary["table2"].items()
    )
    shares = "\n".join(
        f"| {share} | {fmt(v['variance'])} | {v['on_policy_accuracy']:.3f} | {v['off_policy_accuracy']:.3f} | {fmt(v['gt_gain'])} |"
        for share, v in summary["by_share"].items()
    )
    c, m = summary["chen"], summary["moderate_accuracy"]
    signs = (
        "Against the paper's ground-truth correlations (Spearman intervals of the trained models): "
        + "; ".join(f"{names[p]}: {v}" for p, v in summary["table2_verdicts"].items())
        + "."
    )
    stated = (
        f" The most accurate are {fmt_interval(m['accuracy_gap'])} more accurate than the best and teach "
        f"{fmt_interval([100 * v for v in m['relative_gain_gap']])}% less (95% intervals resampling whole runs);"
    )
    rule = f"{MODERATE_GAP:g} (a point of accuracy, 1% of gain)"
    gaps = (m["accuracy_gap"], m["relative_gain_gap"])
    if all(low > MODERATE_GAP for _, low, _ in gaps):
        found = f" both lie above {rule}: the best teachers sit at moderate accuracy here, as Chen et al. found."
    elif any(high < MODERATE_GAP for _, _, high in gaps):
        found = (
            f" at least one lies below {rule}: the moderate-accuracy optimum of Chen et al. does not appear in this "
            "exact model."
        )
    else:
        found = (
            f" neither do both lie above {rule} nor does one lie below it: whether Chen et al.'s moderate-accuracy "
            "optimum appears here is undecided."
        )
    verdict = signs + stated + found
    return f"""## The accuracy paradox, exact

**Verdict:** {summary["instances"]} Bradley-Terry reward models ({c["runs"]} runs x {len(config.checkpoints)} checkpoints), each scored by exact flow. On-policy accuracy spans {summary["accuracy_range"]["on_policy"][0]:.2f} to {summary["accuracy_range"]["on_policy"][1]:.2f}.

Correlation with the reward increase (Pearson / Spearman, each with a 95% bootstrap interval over
models) over the {summary["table2_models"]} trained models (last checkpoint, largest datasets, every
on-policy share), beside Razin et al. Table 2 and a verdict from the Spearman interval
(docs/theory.md#experiments-of-razin-et-al), and over all {summary["instances"]} checkpoints (their interval
resamples whole runs, since the checkpoints of a run share its data):

| property | proxy gain (here) | proxy (paper) | ground-truth gain (here) | ground truth (paper) | verdict | ground truth, all checkpoints |
|---|---|---|---|---|---|---|
{rows}

Final reward models of the largest datasets, by share of on-policy pairs (Table 1's layout):

| on-policy pairs | variance | on-policy accuracy | off-policy accuracy | ground-truth gain |
|---|---|---|---|---|
{shares}

Along each training run (Chen et al.'s protocol), the checkpoint that teaches best is not the
most accurate one in {fmt_share(c["best_is_not_most_accurate_runs"], c["runs"], "runs")}; the interval is over
training runs on this one task (its data and initialisation differ from run to run, its ground truth does not): the best has mean
on-policy accuracy {c["mean_accuracy_of_best"]:.3f} and variance {fmt(c["mean_variance_of_best"])},
the most accurate {c["mean_accuracy_of_most_accurate"]:.3f} and {fmt(c["mean_variance_of_most_accurate"])};
mean ground-truth gain {fmt(c["mean_gt_gain_of_best"])} against {fmt(c["mean_gt_gain_of_most_accurate"])}.

Across all checkpoints, the top {100 * m["share"]:.0f}% of teachers by ground-truth gain have mean on-policy
accuracy {m["accuracy_of_best_teachers"]:.3f} (gain {fmt(m["gain_of_best_teachers"])}); the top {100 * m["share"]:.0f}% by accuracy
have {m["accuracy_of_most_accurate"]:.3f} (gain {fmt(m["gain_of_most_accurate"])}). {verdict}

![gain against accuracy](figures/{NAME}.png)
"""
