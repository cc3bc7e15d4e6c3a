"""README and the quick preset stay in sync with the code."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from torchpocket.cli import flags_markdown
from torchpocket.config import default_config

ROOT = Path(__file__).resolve().parents[1]


def test_readme_option_table_is_current() -> None:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- flags:start -->\n(.*?)\n<!-- flags:end -->", text, re.S)
    assert block, "README lost its flags block"
    assert block.group(1) == flags_markdown().rstrip("\n"), (
        "README's option table is stale: regenerate it with "
        "python -c 'from torchpocket.cli import flags_markdown; print(flags_markdown())'"
    )


def test_readme_quickstart_shows_make_run_and_make_test_first() -> None:
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quickstart", 1)[1]
    first_block = quick.split("```bash", 1)[1].split("```", 1)[0]
    assert first_block.lstrip().startswith("make run") and "make test" in first_block
    makefile = (ROOT / "Makefile").read_text()
    assert "run.py --learner chn-pruned --hpo ddpg --target 0.5" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_cpu_quick_preset_equals_the_defaults() -> None:
    preset = yaml.safe_load((ROOT / "configs" / "cpu-quick.yaml").read_text())
    defaults = default_config()
    for section, values in preset.items():
        for key, value in values.items():
            assert defaults[section][key] == value, f"{section}.{key}: preset {value!r} != default"


def test_readme_lists_every_registered_plugin() -> None:
    from torchpocket.hpo import HPOS
    from torchpocket.learners import LEARNERS

    text = (ROOT / "README.md").read_text()
    for name in [*LEARNERS.names(), *HPOS.names()]:
        assert f"`{name}`" in text, name
