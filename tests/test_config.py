"""Config: defaults per section, YAML loading, merge with key/type checks, and validate()."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from torchpocket.config import default_config, dump_yaml, load_yaml, merge, validate
from torchpocket.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def defaults() -> dict[str, dict[str, Any]]:
    return default_config()


def test_default_config_has_the_core_sections(defaults: dict[str, dict[str, Any]]) -> None:
    assert {"run", "data", "train", "search"} <= set(defaults)
    assert len(defaults) > 4  # optimizers / learners add their own sections
    assert defaults["run"]["target"] == 1.0 and isinstance(defaults["run"]["target"], float)
    assert isinstance(defaults["train"]["epochs"], int)
    validate(defaults)  # the defaults are a valid run


def test_default_config_is_a_fresh_copy(defaults: dict[str, dict[str, Any]]) -> None:
    cfg = default_config()
    cfg["train"]["epochs"] = 12345
    assert default_config()["train"]["epochs"] == defaults["train"]["epochs"] != 12345


def test_merge_nested_override(defaults: dict[str, dict[str, Any]]) -> None:
    before = copy.deepcopy(defaults)
    out = merge(defaults, {"train": {"epochs": 3, "lr": 0.05}, "run": {"net": "vgg16"}}, "test")
    assert out["train"]["epochs"] == 3 and out["train"]["lr"] == 0.05 and out["run"]["net"] == "vgg16"
    assert out["train"]["momentum"] == defaults["train"]["momentum"]  # untouched keys survive
    assert out["data"] == defaults["data"]
    assert defaults == before  # the base is not modified
    again = merge(out, {"train": {"epochs": 5}}, "flags")  # later sources win
    assert again["train"]["epochs"] == 5 and again["run"]["net"] == "vgg16"


def test_int_is_accepted_for_float_fields(defaults: dict[str, dict[str, Any]]) -> None:
    out = merge(defaults, {"run": {"target": 1}, "train": {"lr": 0}}, "test")
    assert out["run"]["target"] == 1.0 and isinstance(out["run"]["target"], float)
    assert isinstance(out["train"]["lr"], float)


def test_optional_fields_take_none_or_their_type(defaults: dict[str, dict[str, Any]]) -> None:
    out = merge(defaults, {"run": {"init": "runs/x/model.pt"}, "data": {"data_dir": None}}, "test")
    assert out["run"]["init"] == "runs/x/model.pt" and out["data"]["data_dir"] is None
    with pytest.raises(UserError, match=r"run\.init: expected str, got int 3"):
        merge(defaults, {"run": {"init": 3}}, "test")


def test_unknown_section_is_named(defaults: dict[str, dict[str, Any]]) -> None:
    with pytest.raises(UserError) as exc:
        merge(defaults, {"trian": {"epochs": 1}}, "preset.yaml")
    msg = str(exc.value)
    assert msg.startswith("preset.yaml: unknown section 'trian'")
    assert "train" in msg and "search" in msg


def test_unknown_key_is_named_with_valid_keys(defaults: dict[str, dict[str, Any]]) -> None:
    with pytest.raises(UserError) as exc:
        merge(defaults, {"train": {"epoch": 1}}, "preset.yaml")
    msg = str(exc.value)
    assert "unknown key train.epoch" in msg
    assert "epochs" in msg and "batch_size" in msg


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ({"train": {"epochs": "ten"}}, r"train\.epochs: expected int, got str 'ten'"),
        ({"train": {"epochs": 2.5}}, r"train\.epochs: expected int, got float"),
        ({"train": {"epochs": True}}, r"train\.epochs: expected int, got bool"),  # bool is not an int here
        ({"train": {"lr": "fast"}}, r"train\.lr: expected float"),
        ({"train": {"lr": False}}, r"train\.lr: expected float"),
        ({"run": {"quiet": 1}}, r"run\.quiet: expected bool, got int"),
        ({"run": {"net": 20}}, r"run\.net: expected str"),
        ({"run": {"target": None}}, r"run\.target: expected float"),
        ({"train": [1, 2]}, r"section 'train' must be a mapping"),
    ],
)
def test_wrong_types_are_user_errors(defaults: dict[str, dict[str, Any]], override: dict, where: str) -> None:
    with pytest.raises(UserError, match=where):
        merge(defaults, override, "cfg")


def _write(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "preset.yaml"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def test_load_yaml_round_trip(tmp_path: Path, defaults: dict[str, dict[str, Any]]) -> None:
    p = _write(tmp_path, "train:\n  epochs: 7\n  lr: 0.2\nrun:\n  hpo: random\n")
    out = merge(defaults, load_yaml(p), str(p))
    assert (out["train"]["epochs"], out["train"]["lr"], out["run"]["hpo"]) == (7, 0.2, "random")
    assert load_yaml(_write(tmp_path, "# only a comment\n")) == {}
    full = _write(tmp_path, dump_yaml(out))  # the saved config of a run loads back to itself
    assert merge(defaults, load_yaml(full), "saved") == out


def test_load_yaml_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")


def test_load_yaml_unparsable(tmp_path: Path) -> None:
    p = _write(tmp_path, "train:\n  epochs: [1, 2\n  lr: 0.1\n")
    with pytest.raises(UserError, match=r"does not parse as YAML \(line \d+\)"):
        load_yaml(p)


@pytest.mark.parametrize("text", ["- train\n- run\n", "42\n", "just a string\n"])
def test_load_yaml_non_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(UserError, match="expected a mapping of sections"):
        load_yaml(_write(tmp_path, text))


@pytest.mark.parametrize("text", ["[]\n", "0\n", "false\n"])
def test_load_yaml_falsy_non_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(UserError, match="expected a mapping of sections"):
        load_yaml(_write(tmp_path, text))


def test_load_yaml_binary_file(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        load_yaml(_write(tmp_path, b"\xff\xfe\x00\x81 not text"))


def test_scientific_notation_is_a_float(tmp_path: Path, defaults: dict[str, dict[str, Any]]) -> None:
    out = merge(defaults, load_yaml(_write(tmp_path, "train:\n  lr: 1e-3\n")), "preset")
    assert out["train"]["lr"] == pytest.approx(0.001)


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_presets_merge_and_validate(preset: Path, defaults: dict[str, dict[str, Any]]) -> None:
    validate(merge(defaults, load_yaml(preset), str(preset)))


def _with(defaults: dict[str, dict[str, Any]], section: str, key: str, value: Any) -> dict[str, dict[str, Any]]:
    cfg = copy.deepcopy(defaults)
    cfg[section][key] = value
    return cfg


@pytest.mark.parametrize("target", [0, 0.0, 1.5, -0.2, float("nan")])
def test_validate_rejects_target_outside_unit_interval(defaults: dict[str, dict[str, Any]], target: float) -> None:
    with pytest.raises(UserError, match=r"--target must be in \(0, 1\]"):
        validate(_with(defaults, "run", "target", target))


@pytest.mark.parametrize("target", [1.0, 0.5, 1e-3])
def test_validate_accepts_targets_in_unit_interval(defaults: dict[str, dict[str, Any]], target: float) -> None:
    validate(_with(defaults, "run", "target", target))


@pytest.mark.parametrize(
    ("section", "key"), [("train", "epochs"), ("search", "retrain_epochs"), ("search", "ft_steps")]
)
def test_validate_rejects_negative_counts(defaults: dict[str, dict[str, Any]], section: str, key: str) -> None:
    with pytest.raises(UserError, match=rf"{section}\.{key} must not be negative, got -1"):
        validate(_with(defaults, section, key, -1))
    validate(_with(defaults, section, key, 0))


def test_validate_val_size_and_episodes_allow_minus_one_for_auto(defaults: dict[str, dict[str, Any]]) -> None:
    validate(_with(defaults, "data", "val_size", -1))
    validate(_with(defaults, "search", "episodes", -1))
    with pytest.raises(UserError, match="val_size must not be negative"):
        validate(_with(defaults, "data", "val_size", -2))
    with pytest.raises(UserError, match="episodes must not be negative"):
        validate(_with(defaults, "search", "episodes", -2))


def test_validate_rejects_zero_batch_size(defaults: dict[str, dict[str, Any]]) -> None:
    with pytest.raises(UserError, match="batch-size must be positive"):
        validate(_with(defaults, "train", "batch_size", 0))


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("learner", "chn-prune-typo", r"unknown learner 'chn-prune-typo'.*choose one of: .*full-prec"),
        ("hpo", "ddgp", r"unknown .*'ddgp' \(did you mean 'ddpg'\?\)"),
        ("dataset", "cifar1", r"unknown dataset 'cifar1' \(did you mean 'cifar10'\?\)"),
        ("net", "resnet2", r"unknown net 'resnet2' \(did you mean 'resnet20'\?\)"),
        ("net", "tv:resnet1", r"did you mean 'tv:resnet18'"),
    ],
)
def test_validate_rejects_unknown_names(defaults: dict[str, dict[str, Any]], key: str, value: str, match: str) -> None:
    with pytest.raises(UserError, match=match):
        validate(_with(defaults, "run", key, value))


def test_validate_skips_the_net_name_when_starting_from_a_checkpoint(defaults: dict[str, dict[str, Any]]) -> None:
    cfg = _with(defaults, "run", "net", "not-a-net")
    cfg["run"]["init"] = "runs/x/model.pt"  # the checkpoint carries its own architecture
    validate(cfg)


def test_validate_checks_choices(defaults: dict[str, dict[str, Any]]) -> None:
    with pytest.raises(UserError, match=r"--schedule must be one of cosine, .*got 'linear'"):
        validate(_with(defaults, "train", "schedule", "linear"))
