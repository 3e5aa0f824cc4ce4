"""The docstring examples are tests: they must run and print what they show."""

import doctest
import importlib
import inspect
import re
from pathlib import Path

import jax
import pytest

MODULES = [
    "jaxrm.metrics",
    "jaxrm.tabular",
    "jaxrm.flow",
    "jaxrm._queue",
    "jaxrm.bounds",
    "jaxrm.pg",
    "jaxrm.ascent",
    "jaxrm.train.rlhf",
    "jaxrm.train.optimizers",
    "jaxrm.models.config",
    "jaxrm.models.sampling",
    "jaxrm.train.reward",
    "jaxrm.estimators",
    "jaxrm.studies",
    "theory.tightness",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    # As a user runs them: JAX's default float32 (this suite turns float64 on for everything else).
    with jax.enable_x64(False):
        result = doctest.testmod(
            importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
        )
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0


@pytest.mark.parametrize("name", ["jaxrm.metrics", "jaxrm.pg", "jaxrm.tabular", "jaxrm.bounds"])
def test_every_public_kernel_shows_an_example(name):
    """docs/design.md#conventions: each kernel's docstring carries a doctest."""
    module = importlib.import_module(name)
    functions = [n for n in module.__all__ if inspect.isfunction(getattr(module, n))]
    assert functions, f"{name} exports no function"
    assert [n for n in functions if ">>>" not in (getattr(module, n).__doc__ or "")] == []


ROOT = Path(__file__).parents[1]
CITATION = re.compile(r"docs/(theory|design)\.md#([\w-]+)")


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.+)$", path.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def _repository_texts():
    for pattern in ("jaxrm/**/*.py", "theory/*.py", "experiments/**/*.py", "tests/*.py", "*.md", "docs/*.md"):
        yield from ROOT.glob(pattern)


def test_citations_point_into_the_repositorys_own_docs():
    anchors = {name: _anchors(ROOT / "docs" / f"{name}.md") for name in ("theory", "design")}
    cited = 0
    for path in _repository_texts():
        text = path.read_text()
        if path.name != "test_docs.py":
            assert not re.search(r"\b(THEORY|DESIGN)\.md", text), f"{path} cites a file outside the repository"
        for name, anchor in CITATION.findall(text):
            assert anchor in anchors[name], f"{path} cites docs/{name}.md#{anchor}, which has no such heading"
            cited += 1
    assert cited > 20
