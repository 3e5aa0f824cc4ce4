"""jaxrm.train.reward: the Bradley-Terry loss, a training run with checkpoints, and bad pairs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrm.models import RewardModel, preset
from jaxrm.models.checkpoint import load_model, read_metadata
from jaxrm.train import (
    PreferencePairs,
    RewardTrainConfig,
    bradley_terry_loss,
    evaluate_reward_model,
    pairwise_accuracy,
    train_reward_model,
    train_reward_models,
)
from jaxrm.train.loop import epoch_order
from jaxrm.train.reward import pair_rewards

VOCAB = preset("tiny").vocab_size


def _pairs(n, seed):
    """Random prompts and responses; the chosen one holds more tokens below 30 (a learnable rule)."""
    rng = np.random.default_rng(seed)
    prompts, chosen, rejected = [], [], []
    while len(prompts) < n:
        a, b = (list(rng.integers(1, VOCAB, rng.integers(1, 5))) for _ in range(2))
        score_a, score_b = sum(t < 30 for t in a), sum(t < 30 for t in b)
        if score_a != score_b:
            prompts.append(list(rng.integers(1, VOCAB, rng.integers(1, 4))))
            chosen.append(a if score_a > score_b else b)
            rejected.append(b if score_a > score_b else a)
    return PreferencePairs.from_lists(prompts, chosen, rejected)


def test_bradley_terry_loss_and_accuracy_by_hand():
    chosen, rejected = jnp.array([1.0, 0.0, 0.5]), jnp.array([0.0, 2.0, 0.5])
    margins = np.array([1.0, -2.0, 0.0])
    plain = np.mean(np.log1p(np.exp(-margins)))
    np.testing.assert_allclose(bradley_terry_loss(chosen, rejected), plain, rtol=1e-12)
    centered = plain + 0.01 * np.mean(np.array([1.0, 2.0, 1.0]) ** 2)
    np.testing.assert_allclose(bradley_terry_loss(chosen, rejected, centering=0.01), centered, rtol=1e-12)
    assert float(pairwise_accuracy(chosen, rejected)) == pytest.approx(1 / 3)  # the tie counts as wrong


def test_training_learns_the_preference_and_checkpoints_each_chosen_step(tmp_path):
    train, held_out = _pairs(640, seed=0), _pairs(160, seed=1)
    model = RewardModel(preset("tiny"), rngs=nnx.Rngs(0))
    config = RewardTrainConfig(learning_rate=3e-3, batch_size=32, epochs=3)
    lines = []
    result = train_reward_model(
        model,
        train,
        config,
        eval_pairs=held_out,
        eval_steps=(0, 10, 60),
        checkpoint_dir=tmp_path,
        checkpoint_steps=(0, 10, 30),
        log=lines.append,
    )
    accuracy = [e["accuracy"] for e in result.evaluations]
    assert [e["step"] for e in result.evaluations] == [0, 10, 60]
    assert accuracy[0] == 0.0 and accuracy[2] > 0.85 and accuracy[2] > accuracy[1]  # zero head: all ties at first
    assert result.losses.shape == (60,) and result.losses[-10:].mean() < 0.5 * result.losses[:5].mean()
    assert len(lines) == 3 and "60/60" in lines[-1]
    assert [p.name for p in result.checkpoints] == ["step_000000", "step_000010", "step_000030"]
    # The checkpoint at step 10 holds the model that scored accuracy[1].
    restored = load_model(result.checkpoints[1])
    assert read_metadata(result.checkpoints[1])["accuracy"] == accuracy[1]
    assert evaluate_reward_model(restored, held_out)["accuracy"] == pytest.approx(accuracy[1])
    final = evaluate_reward_model(result.model, held_out)
    assert final["accuracy"] == accuracy[2] and final["margin"] > 0
    with pytest.raises(FileExistsError, match="already holds"):
        train_reward_model(model, train, config, checkpoint_dir=tmp_path, checkpoint_steps=(10,), log=None)


def test_bad_pairs_fail_before_training():
    model = RewardModel(preset("tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mismatched pair lists"):
        PreferencePairs.from_lists([[1], [2]], [[3], [4]], [[5]])
    with pytest.raises(ValueError, match="empty rejected"):
        train_reward_model(model, PreferencePairs.from_lists([[1]] * 40, [[3]] * 40, [[4]] * 39 + [[]]), log=None)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        train_reward_model(model, PreferencePairs.from_lists([[1]] * 40, [[3, VOCAB]] * 40, [[4]] * 40), log=None)
    good = _pairs(40, seed=2)
    short = good.replace(chosen_mask=good.chosen_mask[:, :-1])
    with pytest.raises(ValueError, match="mismatched pairs"):
        train_reward_model(model, short, log=None)
    narrow = good.replace(rejected=good.rejected[:, :1], rejected_mask=good.rejected_mask[:, :1])
    with pytest.raises(ValueError, match=r"mismatched pairs: chosen \(40, \d+\) and rejected \(40, 1\) must be padded"):
        train_reward_model(model, narrow, log=None)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_reward_model(model, _pairs(8, seed=3), log=None)
    with pytest.raises(ValueError, match="must lie in"):
        train_reward_model(model, good, eval_pairs=good, eval_steps=(5,), log=None)
    with pytest.raises(ValueError, match="learning_rate"):
        RewardTrainConfig(learning_rate=0.0)


def test_reward_models_trained_side_by_side_match_one_at_a_time(tmp_path):
    datasets, held_out = [_pairs(96, seed=s) for s in (2, 3)], _pairs(64, seed=4)
    start = RewardModel(preset("tiny"), rngs=nnx.Rngs(0))
    before = [np.array(x) for x in jax.tree.leaves(nnx.state(start))]
    config = RewardTrainConfig(learning_rate=3e-3, batch_size=32, epochs=2)
    batched = train_reward_models(
        start,
        datasets,
        config,
        seeds=[5, 6],
        eval_pairs=held_out,
        eval_steps=(6,),
        checkpoint_dirs=[tmp_path / "a", tmp_path / "b"],
        checkpoint_steps=(3,),
        log=None,
    )
    # The initial model is left as it was; each run equals the same run alone (its data, its
    # seed), in its losses, its evaluation and its save at step 3.
    assert all(np.array_equal(a, b) for a, b in zip(before, jax.tree.leaves(nnx.state(start))))
    assert [p.parent.name for r in batched for p in r.checkpoints] == ["a", "b"]
    for result, data, seed in zip(batched, datasets, (5, 6)):
        alone = train_reward_model(
            RewardModel(preset("tiny"), rngs=nnx.Rngs(0)),
            data,
            dataclasses.replace(config, seed=seed),
            eval_pairs=held_out,
            eval_steps=(6,),
            checkpoint_dir=tmp_path / f"alone_{seed}",
            checkpoint_steps=(3,),
            log=None,
        )
        np.testing.assert_allclose(result.losses, alone.losses, rtol=1e-4, atol=1e-6)
        assert result.evaluations[0]["accuracy"] == pytest.approx(alone.evaluations[0]["accuracy"], abs=1 / 64)
        for ours, theirs in zip(
            jax.tree.leaves(nnx.state(load_model(result.checkpoints[0]))),
            jax.tree.leaves(nnx.state(load_model(alone.checkpoints[0]))),
        ):  # float32 sums in another order, amplified a little by Adam over 3 steps
            np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=5e-5)
    assert not np.allclose(batched[0].losses, batched[1].losses)
    with pytest.raises(ValueError, match="same shapes"):
        train_reward_models(start, [_pairs(96, 2), _pairs(64, 3)], config, log=None)
    with pytest.raises(ValueError, match="one int per dataset"):
        train_reward_models(start, datasets, config, seeds=[1], log=None)


def test_the_centering_term_enters_the_training_loss():
    """The first step's loss (at the initial parameters, its one batch holding every pair) is the
    Bradley-Terry loss plus ``centering * mean((r_c + r_r)^2)``, which a nonzero score head makes
    positive."""
    pairs = _pairs(32, seed=2)
    model = RewardModel(preset("tiny"), rngs=nnx.Rngs(0))
    model.score.kernel[...] = jax.random.normal(jax.random.key(1), model.score.kernel.shape, jnp.float32)
    chosen, rejected = (np.asarray(r, np.float64) for r in pair_rewards(model, pairs))
    centering = np.mean((chosen + rejected) ** 2)
    plain = np.mean(np.logaddexp(0.0, rejected - chosen))  # -log sigmoid(r_c - r_r)
    config = RewardTrainConfig(batch_size=32, epochs=1, centering=1.0)
    first = train_reward_model(model, pairs, config, log=None).losses[0]
    assert centering > 1e-3
    np.testing.assert_allclose(first, plain + centering, rtol=1e-5)


def test_epochs_take_fresh_permutations():
    order = epoch_order(10, 5, 2, seed=0)
    assert order.shape == (4, 5)
    first, second = np.sort(order[:2].ravel()), np.sort(order[2:].ravel())
    np.testing.assert_array_equal(first, np.arange(10))
    np.testing.assert_array_equal(second, np.arange(10))
    assert not np.array_equal(order[:2], order[2:])


def test_a_diverging_run_stops_at_its_step_and_keeps_the_checkpoints_before_it(tmp_path):
    model = RewardModel(preset("tiny"), rngs=nnx.Rngs(0))
    config = RewardTrainConfig(learning_rate=1e37, batch_size=32, epochs=2)
    with pytest.raises(FloatingPointError, match=r"diverged: run 0's loss is (nan|inf) at optimizer step [2-4] "):
        train_reward_model(
            model, _pairs(64, seed=2), config, checkpoint_dir=tmp_path, checkpoint_steps=(0, 4), log=None
        )
    assert [p.name for p in tmp_path.iterdir()] == ["step_000000"]
