"""The docstring examples are tests: they must run and print what they show."""

import doctest
import importlib

import pytest

MODULES = [
    "jaxrm.metrics",
    "jaxrm.tabular",
    "jaxrm.flow",
    "jaxrm.bounds",
    "jaxrm.pg",
    "jaxrm.ascent",
    "jaxrm.train.rlhf",
    "jaxrm.models.config",
    "jaxrm.models.sampling",
    "jaxrm.train.reward",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
