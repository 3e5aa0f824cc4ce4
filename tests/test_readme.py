"""README.md's Python blocks run as written, top to bottom in one namespace, so README cannot drift
from the code. The only stand-in: ``path/to/pythia-410m`` becomes a tiny local GPT-NeoX checkpoint."""

import re
from pathlib import Path

import numpy as np
from tiny_checkpoint import save_tiny_gpt_neox

README = Path(__file__).parents[1] / "README.md"
STAND_IN_PATH = "path/to/pythia-410m"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_every_python_block_of_the_readme_runs(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 3 and any(STAND_IN_PATH in block for block in blocks)
    checkpoint = save_tiny_gpt_neox(tmp_path / "pythia", vocab_size=4096)  # README prompts use token 3158
    monkeypatch.chdir(tmp_path)  # the blocks write runs/ into the working directory
    namespace: dict = {}
    for index, block in enumerate(blocks):
        code = compile(block.replace(STAND_IN_PATH, str(checkpoint)), f"README.md python block {index + 1}", "exec")
        exec(code, namespace)
    # What the blocks claim: exact t_gamma per prompt, accuracy 1, a trained reward model, a run directory.
    assert namespace["t"].shape == (4,) and np.isfinite(namespace["t"]).all()
    assert float(namespace["metrics"].accuracy(namespace["r_rm"], namespace["r_gt"]).min()) == 1.0
    assert namespace["out"].tokens.shape == (2, 16)
    assert (tmp_path / "runs" / "rm" / "step_000008").is_dir()
    assert namespace["history"]["ground_truth_reward"].shape == (2, 4)
    assert (tmp_path / "runs" / "rloo" / "metrics.jsonl").read_text().count("\n") == 2 * 4
