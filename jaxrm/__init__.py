"""jaxrm: controlled experiments on what makes a reward model a good teacher, in JAX.

Exact side: :mod:`jaxrm.metrics` (reward variance, accuracy, KL), :mod:`jaxrm.pg`
(policy-gradient kernels), :mod:`jaxrm.tabular` (exact policies and the RLHF objective),
:mod:`jaxrm.flow` (gradient flow, ``t_gamma``), :mod:`jaxrm.ascent` (exact and sampled discrete
ascent), :mod:`jaxrm.bounds` (the papers' bounds with their constants, docs/theory.md),
:mod:`jaxrm.studies` (plumbing of the runnable studies).

Transformer side (imported on demand, they load flax and orbax): :mod:`jaxrm.models` (GPT-NeoX /
Pythia policies and reward models, KV-cache sampling, Hugging Face import, model checkpoints),
:mod:`jaxrm.train` (reward models, SFT, RLHF iterations, the run driver), :mod:`jaxrm.sharding`
(meshes and parameter placement).
"""

from jaxrm import bounds, flow, metrics, tabular

__version__ = "0.1.0"

__all__ = ["bounds", "flow", "metrics", "tabular", "__version__"]
