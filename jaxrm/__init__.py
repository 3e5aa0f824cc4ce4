"""jaxrm: controlled experiments on what makes a reward model a good teacher, in JAX.

Modules: :mod:`jaxrm.metrics` (reward variance, accuracy, KL), :mod:`jaxrm.tabular` (exact
tabular policies and the RLHF objective), :mod:`jaxrm.flow` (gradient flow, ``t_gamma``,
discrete ascent), :mod:`jaxrm.bounds` (the papers' bounds with their constants).

Transformer side (imported on demand, they load flax and orbax): :mod:`jaxrm.models` (GPT-NeoX /
Pythia policies and reward models, KV-cache sampling, Hugging Face import), :mod:`jaxrm.train`
(Bradley-Terry reward-model training), :mod:`jaxrm.sharding` (meshes and parameter placement),
:mod:`jaxrm.checkpoint` (atomic orbax model checkpoints).
"""

from jaxrm import bounds, flow, metrics, tabular

__version__ = "0.1.0"

__all__ = ["bounds", "flow", "metrics", "tabular", "__version__"]
