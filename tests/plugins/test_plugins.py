"""One file + one decorator: the toy plug-ins register like any plug-in and pass both family suites.

``toy_learner.py`` and ``toy_optimizer.py`` register at import. They are imported only inside
:func:`plugins` (the registries' ``restoring`` blocks), so the rest of the session sees the
registries exactly as the package fills them (``tests/test_docs.py`` checks that the docs list
every registered plug-in). The suites' checks are plain functions, called here for the toys.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import pytest

import tests.hpo.test_optimizer_suite as hpo_suite
import tests.learners.test_learner_suite as learner_suite
from torchpocket.errors import UserError
from torchpocket.hpo import HPOS
from torchpocket.learners import LEARNERS
from torchpocket.registry import Registry

TOY_LEARNER, TOY_HPO = "toy-magnitude", "toy-hill-climb"
MODULES = ("tests.plugins.toy_learner", "tests.plugins.toy_optimizer")


@contextmanager
def plugins(*modules: str) -> Iterator[list[ModuleType]]:
    """Import plug-in modules, undoing their registrations at the end (and forgetting the modules, so that the
    next import registers them again)."""
    with LEARNERS.restoring(), HPOS.restoring():
        for m in modules:
            sys.modules.pop(m, None)
        try:
            yield [importlib.import_module(m) for m in modules]
        finally:
            for m in modules:
                sys.modules.pop(m, None)
            learner_suite.prepared.cache_clear()  # holds the last prepared learner


@pytest.fixture
def toys() -> Iterator[list[ModuleType]]:
    with plugins(*MODULES) as mods:
        yield mods


# -- temporary registration ----------------------------------------------------------------------------------


def test_restoring_undoes_registrations_and_removals() -> None:
    reg: Registry = Registry("widget")
    reg.register("alpha", doc="first")(lambda: "a")
    with reg.restoring():
        reg.register("beta")(lambda: "b")
        assert reg.unregister("alpha")() == "a"
        assert reg.names() == ["beta"] and reg.doc("alpha") == ""
    assert reg.names() == ["alpha"] and reg.doc("alpha") == "first"
    with pytest.raises(RuntimeError), reg.restoring():  # also when the block fails
        reg.register("gamma")(lambda: "g")
        raise RuntimeError("boom")
    assert reg.names() == ["alpha"]


def test_unregister_an_unknown_name_lists_the_choices() -> None:
    reg: Registry = Registry("widget")
    reg.register("alpha")(lambda: "a")
    with pytest.raises(UserError, match="unknown widget 'alpa'.*choose one of: alpha"):
        reg.unregister("alpa")
    assert reg.unregister("alpha")() == "a" and len(reg) == 0


def test_toys_are_registered_only_inside_the_block() -> None:
    before = (LEARNERS.names(), HPOS.names())
    assert TOY_LEARNER not in LEARNERS and TOY_HPO not in HPOS
    for _ in range(2):  # the second import registers again: no duplicate-name error
        with plugins(*MODULES) as (learner, optimizer):
            assert LEARNERS.get(TOY_LEARNER) is learner.ToyMagnitudeLearner
            assert HPOS.get(TOY_HPO) is optimizer.ToyHillClimb
            assert set(LEARNERS.names()) - set(before[0]) == {TOY_LEARNER}
            assert set(HPOS.names()) - set(before[1]) == {TOY_HPO}
        assert (LEARNERS.names(), HPOS.names()) == before


# -- the learner suite on the toy learner ---------------------------------------------------------------------


def test_toy_learner_declarations(toys: list[ModuleType]) -> None:
    assert learner_suite.target_scale(TOY_LEARNER) == 1.0  # so the cases below are the suite's own
    learner_suite.check_declarations(TOY_LEARNER)


@pytest.mark.parametrize(("net", "target"), learner_suite.contract_cases())
def test_toy_learner_contract(toys: list[ModuleType], net: str, target: float, tmp_path: Any) -> None:
    learner_suite.check_learner_contract(TOY_LEARNER, net, target, tmp_path)


@pytest.mark.parametrize(("net", "target"), learner_suite.training_cases())
def test_toy_learner_training_keeps_the_compression(toys: list[ModuleType], net: str, target: float,
                                                    tmp_path: Any) -> None:
    learner_suite.check_training_keeps_the_compression(TOY_LEARNER, net, target, tmp_path)


def test_the_training_check_catches_pruned_weights_growing_back(toys: list[ModuleType],
                                                                monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Without its after_step hook the toy's masks are not enforced, and the suite says so."""
    learner = toys[0]
    monkeypatch.setattr(learner.ToyMagnitudeLearner, "after_step", lambda self, model: None)
    with pytest.raises(AssertionError, match="no longer measures what the Budget says"):
        learner_suite.check_training_keeps_the_compression(TOY_LEARNER, "resnet20", 0.5, tmp_path)


# -- the optimizer suite on the toy optimizer -----------------------------------------------------------------


def test_toy_optimizer_declarations(toys: list[ModuleType]) -> None:
    cls = HPOS.get(TOY_HPO)
    assert cls.seeds_uniform and not cls.parallel
    hpo_suite.check_declarations(TOY_HPO)


@pytest.mark.parametrize("kind", sorted(hpo_suite.SPACES))
def test_toy_optimizer_asks_meet_the_budget(toys: list[ModuleType], kind: str) -> None:
    hpo_suite.check_every_ask_meets_the_budget(TOY_HPO, kind)


@pytest.mark.parametrize("check", [
    hpo_suite.check_same_seed_same_asks,
    hpo_suite.check_resume_continues_like_an_uninterrupted_run,
    hpo_suite.check_a_failed_candidate_does_not_break_the_search,
    hpo_suite.check_layers_with_fixed_bounds_are_left_out_of_the_search,
], ids=lambda f: f.__name__.removeprefix("check_"))
def test_toy_optimizer(toys: list[ModuleType], check: Any) -> None:
    check(TOY_HPO)


def test_toy_optimizer_learns_better_than_random(toys: list[ModuleType]) -> None:
    hpo_suite.check_learns_better_than_random(TOY_HPO, 40)
