"""Registry: decorator registration, duplicates are bugs, unknown names are user errors with choices."""

from __future__ import annotations

import pytest

from torchpocket.errors import UserError
from torchpocket.registry import Registry, closest


def _filled() -> Registry:
    reg: Registry = Registry("widget")

    @reg.register("gamma")
    def gamma() -> str:
        """Third letter.

        More text that is not part of the one-line doc.
        """
        return "g"

    reg.register("alpha", doc="first letter")(lambda: "a")
    reg.register("beta")(lambda: "b")
    return reg


def test_register_get_and_iterate() -> None:
    reg = _filled()
    assert reg.get("alpha")() == "a"
    assert reg.get("gamma")() == "g"
    assert reg.names() == ["alpha", "beta", "gamma"]
    assert list(reg) == ["alpha", "beta", "gamma"]
    assert len(reg) == 3
    assert "beta" in reg and "delta" not in reg


def test_decorator_returns_the_object_unchanged() -> None:
    reg: Registry = Registry("widget")

    def f() -> int:
        return 1

    assert reg.register("f")(f) is f


def test_doc_is_explicit_or_first_docstring_line() -> None:
    reg = _filled()
    assert reg.doc("alpha") == "first letter"
    assert reg.doc("gamma") == "Third letter."
    assert reg.doc("beta") == ""  # a lambda has no docstring
    assert reg.doc("nope") == ""


def test_duplicate_name_raises_value_error() -> None:
    reg = _filled()
    with pytest.raises(ValueError, match="duplicate widget name 'alpha'"):
        reg.register("alpha")(lambda: "again")
    assert reg.get("alpha")() == "a"  # the first registration survives


def test_unknown_name_lists_sorted_choices_and_suggests_closest() -> None:
    reg = _filled()
    with pytest.raises(UserError) as exc:
        reg.get("gama")
    msg = str(exc.value)
    assert "unknown widget 'gama'" in msg
    assert "did you mean 'gamma'?" in msg
    assert msg.endswith("choose one of: alpha, beta, gamma")


def test_unknown_name_without_close_match_has_no_suggestion() -> None:
    reg = _filled()
    with pytest.raises(UserError) as exc:
        reg.get("zzzzzzzz")
    assert "did you mean" not in str(exc.value)
    assert "alpha, beta, gamma" in str(exc.value)


def test_suggestion_prefers_the_longer_common_prefix_on_ties() -> None:
    # difflib scores both equally; alphabetical tie-breaking alone would pick the wrong one here
    assert closest("resnet2", ["resnet110", "resnet20", "resnet32", "resnet44"]) == "resnet20"
    assert closest("net3", ["resnet32", "net30"]) == "net30"
    assert closest("xyz", ["resnet20"]) is None
