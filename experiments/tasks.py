"""A controlled RLHF task whose ground-truth reward is known exactly: topic-conditioned token scores.

Prompts are ``prompt_len`` tokens: a topic marker ``1 + t`` (``t < num_topics``) then filler.
Responses are ``response_len`` tokens. Each topic has a fixed score table ``s[t, y]`` in ``[-1, 1]``
over the response tokens (ids ``num_topics + 1 ..``; any other id scores -1): a topic offset in
``[-topic_spread, topic_spread]`` plus a token part in ``[topic_spread - 1, 1 - topic_spread]``.
The ground truth is graded and exact:

    r_G(x, y) = mean_i s[topic(x), y_i]  in [-1, 1].

Why it is a fair stand-in for the papers' setting (UltraFeedback prompts, an SFT Pythia, a strong
reward model as ground truth):

- the policy must read the prompt (the topic) to do well, and the reward is graded, not 0/1;
- the SFT stage imitates a *noisy* demonstrator ``p_demo(y | t) ∝ exp(a s[t, y] + noise[t, y])``,
  so the initial policy has real spread in ground-truth reward and is imperfect in a structured,
  prompt-dependent way;
- the off-policy responses come from another distribution ``p_off(y | t) ∝ exp(b z[t, y])`` with
  an unrelated table ``z``: pairs of them are labelled by the same ground truth, like UltraFeedback
  responses from other models, but they cover tokens the SFT policy rarely produces; a reward
  model trained on them can be accurate off-policy yet poorly shaped where the policy lives.

Everything is seeded, and the ground truth is a jittable function of token arrays.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class TopicTask:
    """The task's sizes and the seed of its tables (see the module docstring for the model).

    Token ids: 0 is unused by the task (free for padding), ``1 .. num_topics`` are the topic
    markers and ``num_topics + 1 .. vocab_size - 1`` the response tokens. ``vocab_size``,
    ``num_topics``, ``prompt_len``, ``response_len`` and ``topic_spread`` are checked on
    construction.

    Attributes:
      vocab_size: number of token ids; must leave at least 4 response tokens
        (``vocab_size - num_topics - 1 >= 4``).
      num_topics: number of topics ``t`` (>= 2); a prompt starts with the marker ``1 + t``,
        topics drawn uniformly.
      prompt_len: tokens per prompt (>= 1): the topic marker, then ``prompt_len - 1`` filler
        tokens drawn uniformly from the response tokens (they carry no information).
      response_len: tokens per response (>= 1); ``r_G`` is the mean token score over the
        response mask.
      topic_spread: in ``[0, 1)``; each topic's score offset is drawn from
        ``U(-topic_spread, topic_spread)`` and its token part from
        ``U(topic_spread - 1, 1 - topic_spread)``, so scores stay in ``[-1, 1]``. Larger values
        put more of the reward variance between prompts.
      demo_sharpness: ``a`` of the SFT demonstrator ``p_demo(y | t) ∝ exp(a s[t, y] + noise[t, y])``;
        0 makes it ignore the scores, larger values make it greedier.
      demo_noise: standard deviation of the Gaussian ``noise[t, y]`` in the demonstrator's
        logits (>= 0; 0: the demonstrator follows the scores exactly).
      off_policy_sharpness: ``b`` of the off-policy source ``p_off(y | t) ∝ exp(b z[t, y])``
        with ``z ~ U(-1, 1)`` unrelated to the scores; 0 makes it uniform.
      seed: seed of the score, demonstrator and off-policy tables; prompts and responses are
        drawn from the ``numpy`` generator passed to each method.
    """

    vocab_size: int = 40
    num_topics: int = 8
    prompt_len: int = 4
    response_len: int = 8
    topic_spread: float = 0.25
    demo_sharpness: float = 1.5
    demo_noise: float = 1.0
    off_policy_sharpness: float = 1.5
    seed: int = 0

    def __post_init__(self):
        if self.vocab_size - self.num_topics - 1 < 4:
            raise ValueError("vocab_size must leave at least 4 response tokens after the topic markers.")
        if not 0 <= self.topic_spread < 1:
            raise ValueError(f"topic_spread must lie in [0, 1), got {self.topic_spread}.")
        if self.prompt_len < 1 or self.response_len < 1 or self.num_topics < 2:
            raise ValueError("prompt_len and response_len must be >= 1, num_topics >= 2.")

    @property
    def first_response_token(self) -> int:
        return self.num_topics + 1

    @cached_property
    def _tables(self):
        rng = np.random.default_rng(self.seed)
        width = self.vocab_size - self.first_response_token
        # A topic-level offset plus a token-level part: prompts differ in the reward they allow, so
        # (as in the paper's data) part of the reward variance lies between prompts.
        offsets = rng.uniform(-self.topic_spread, self.topic_spread, (self.num_topics, 1))
        token_part = rng.uniform(self.topic_spread - 1, 1 - self.topic_spread, (self.num_topics, width))
        scores = np.full((self.num_topics, self.vocab_size), -1.0)
        scores[:, self.first_response_token :] = offsets + token_part
        demo = self.demo_sharpness * token_part + rng.normal(0, self.demo_noise, (self.num_topics, width))
        off = self.off_policy_sharpness * rng.uniform(-1, 1, (self.num_topics, width))
        return scores, _softmax(demo), _softmax(off)

    @property
    def scores(self) -> np.ndarray:
        """``[num_topics, vocab_size]`` token scores ``s[t, y]``."""
        return self._tables[0]

    def topics(self, prompt) -> jnp.ndarray:
        """Each prompt's topic, ``[batch]``: its first token less 1."""
        return _topics(prompt)

    def ground_truth(self, params, prompt, prompt_mask, response, response_mask):
        """``r_G`` of every row (the teacher signature of :mod:`jaxrm.train.rlhf`; ``params`` unused)."""
        del params, prompt_mask
        return _mean_token_score(jnp.asarray(self.scores, jnp.float32), prompt, response, response_mask)

    def prompts(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """``[count, prompt_len]`` prompts, topics uniform (no padding)."""
        topics = rng.integers(0, self.num_topics, count)
        filler = rng.integers(self.first_response_token, self.vocab_size, (count, self.prompt_len - 1))
        return np.concatenate([1 + topics[:, None], filler], axis=1).astype(np.int32)

    def _responses(self, prompts, rng, distribution) -> np.ndarray:
        topics = np.asarray(prompts)[:, 0] - 1
        cumulative = np.cumsum(distribution[topics], axis=-1)  # [count, width]
        uniform = rng.random((len(topics), self.response_len, 1))
        index = (uniform > cumulative[:, None, :]).sum(-1)
        return (self.first_response_token + np.minimum(index, cumulative.shape[-1] - 1)).astype(np.int32)

    def demonstrations(self, prompts, rng: np.random.Generator) -> np.ndarray:
        """``[count, response_len]`` responses of the SFT demonstrator."""
        return self._responses(prompts, rng, self._tables[1])

    def off_policy_responses(self, prompts, rng: np.random.Generator) -> np.ndarray:
        """``[count, response_len]`` responses of the off-policy source (the UltraFeedback stand-in)."""
        return self._responses(prompts, rng, self._tables[2])

    def sft_data(self, count: int, rng: np.random.Generator):
        """``(tokens, mask, loss_mask)`` of ``count`` prompt + demonstration sequences."""
        prompts = self.prompts(count, rng)
        tokens = np.concatenate([prompts, self.demonstrations(prompts, rng)], axis=1)
        loss_mask = np.zeros(tokens.shape, bool)
        loss_mask[:, self.prompt_len :] = True
        return tokens, np.ones(tokens.shape, bool), loss_mask


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _topics(prompt):
    return prompt[:, 0] - 1


@jax.jit
def _mean_token_score(table, prompt, response, response_mask):
    """Mean of ``table[topic, token]`` over each row's response tokens (compiled: the studies call
    it eagerly on batches of several shapes, where op-by-op dispatch compiled each operation)."""
    topics = _topics(prompt)
    # A policy with a larger vocabulary (a Pythia checkpoint) can draw ids past the table: they
    # score -1 like every other non-response token, where a plain gather would clamp them.
    token_scores = table.at[topics[:, None], response].get(mode="fill", fill_value=-1.0)
    weights = response_mask.astype(jnp.float32)
    return jnp.sum(token_scores * weights, -1) / jnp.maximum(jnp.sum(weights, -1), 1.0)
