"""README, docs/ and the quick preset stay in sync with the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from torchpocket.cli import flags_markdown
from torchpocket.config import default_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_MAX_LINES = 200


def read(rel: str) -> str:
    return (ROOT / rel).read_text(encoding="utf-8")


def test_configuration_option_table_is_current() -> None:
    text = read("docs/configuration.md")
    block = re.search(r"<!-- flags:start -->\n(.*?)\n<!-- flags:end -->", text, re.S)
    assert block, "docs/configuration.md lost its flags block"
    assert block.group(1) == flags_markdown().rstrip("\n"), (
        "docs/configuration.md's option table is stale: regenerate it with "
        "python -c 'from torchpocket.cli import flags_markdown; print(flags_markdown())'"
    )


def test_readme_quickstart_shows_make_run_and_make_test_first() -> None:
    text = read("README.md")
    quick = text.split("## Quickstart", 1)[1]
    first_block = quick.split("```bash", 1)[1].split("```", 1)[0]
    assert first_block.lstrip().startswith("make run") and "make test" in first_block
    makefile = read("Makefile")
    assert "run.py --learner chn-pruned --hpo ddpg --target 0.5" in makefile
    assert "make test" in read(".ci/run")


def test_cpu_quick_preset_equals_the_defaults() -> None:
    preset = yaml.safe_load(read("configs/cpu-quick.yaml"))
    defaults = default_config()
    for section, values in preset.items():
        for key, value in values.items():
            assert defaults[section][key] == value, f"{section}.{key}: preset {value!r} != default"


def test_docs_list_every_registered_plugin() -> None:
    from torchpocket.datasets import DATASETS
    from torchpocket.hpo import HPOS
    from torchpocket.learners import LEARNERS
    from torchpocket.nets import NETS

    pages = {
        "docs/learners.md": LEARNERS.names(),
        "docs/optimizers.md": HPOS.names(),
        "docs/usage.md": [*NETS.names(), *DATASETS.names()],
    }
    for page, names in pages.items():
        text = read(page)
        missing = [name for name in names if f"`{name}`" not in text]
        assert not missing, f"{page} does not mention {missing}"


def test_readme_is_short_and_links_every_docs_page() -> None:
    text = read("README.md")
    lines = text.count("\n") + (not text.endswith("\n"))
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"
    targets = set(re.findall(r"\]\((docs/[^)#\s]+)", text))
    pages = sorted(p.relative_to(ROOT).as_posix() for p in DOCS.iterdir() if p.is_file())
    assert pages, "docs/ is empty"
    missing = [p for p in pages if p not in targets]
    assert not missing, f"README.md links no {missing}"


@pytest.mark.parametrize("page", ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in DOCS.glob("*.md"))])
def test_relative_links_resolve(page: str) -> None:
    base = (ROOT / page).parent
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", read(page)):
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#", target):  # URLs and anchors
            continue
        if not (base / target.split("#", 1)[0]).exists():
            broken.append(target)
    assert not broken, f"{page}: broken links {broken}"


def test_results_page_is_current() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_results.py"), "--check"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr or proc.stdout


def test_readme_results_come_from_the_benchmark_table() -> None:
    readme, table = read("README.md"), read("benchmarks/chn_pruned.md")
    figures = re.findall(r"\d+\.\d+ ± \d+\.\d+", readme.split("## Result", 1)[1].split("## Documentation", 1)[0])
    assert len(figures) == 16
    assert not [f for f in figures if f not in table], "README quotes figures that benchmarks/chn_pruned.md lacks"


def test_extending_example_optimizer_works(monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimizer in docs/extending.md runs against the real base class (in a throwaway registry)."""
    import torchpocket.hpo as hpo
    from torchpocket.registry import Registry
    from torchpocket.space import Budget, LayerSpec, SearchSpace

    code = re.search(r"```python\n(.*?)```", read("docs/extending.md"), re.S)
    assert code, "docs/extending.md lost its example"
    registry: Registry = Registry("optimizer")
    monkeypatch.setattr(hpo, "register_hpo", registry.register)
    exec(compile(code.group(1), "docs/extending.md", "exec"), {"__name__": "docs_example"})  # noqa: S102
    (name,) = registry.names()
    assert f'@register_hpo("{name}")' in code.group(1)

    layers = [LayerSpec(name=f"l{i}", kind="conv", in_channels=8, out_channels=8, stride=1, kernel=3,
                        params=100, flops=100) for i in range(4)]
    budget = Budget(cost_fn=lambda p: 100.0 * sum(p), full=400.0, target=0.5, lows=[0.2] * 4, highs=[1.0] * 4)
    space = SearchSpace(layers, budget)
    opt = registry.get(name)(space, seed=0)
    for t in range(6):
        policy = opt.ask()
        assert budget.satisfied(policy) and opt.last_kind == ("uniform" if t == 0 else "search")
        assert np.all(np.asarray(policy) >= space.lows) and np.all(np.asarray(policy) <= space.highs)
        opt.tell(policy, -abs(policy[0] - 0.8))
    resumed = registry.get(name)(space, seed=0)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.ask() == opt.ask()
