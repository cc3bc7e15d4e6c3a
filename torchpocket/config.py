"""Configuration: each component owns a dataclass of its defaults; precedence is defaults < YAML preset < flags.

A config is a dict of sections (``run``, ``data``, ``train``, ``search`` and one per
learner / optimizer that has options). The command-line parser is generated from
the dataclass fields (help text and flag in field metadata), so every option is
listed by ``--help`` with its default, and a YAML preset uses the same section and
field names. The merged config is validated before any data or model is touched.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from torchpocket.errors import UserError
from torchpocket.hpo import HPOS
from torchpocket.learners import LEARNERS
from torchpocket.learners.training import TrainConfig
from torchpocket.options import opt
from torchpocket.registry import Registry


@dataclass
class RunConfig:
    learner: str = opt("full-prec", "compression algorithm (see --list)")
    hpo: str = opt("none", "hyper-parameter optimizer proposing per-layer policies (see --list)")
    net: str = opt("resnet20", "network: a registered name, tv:<torchvision model> (see --list), timm:<name>, or "
                               "your own: path/to/models.py:build_net or package.module:build_net, called with "
                               "in_channels= and num_classes=")
    dataset: str = opt("fashion-mnist", "dataset (see --list)")
    target: float = opt(1.0, "resource to keep, as a fraction of the original model's, in (0, 1]")
    resource: str = opt("auto", "what --target constrains, one the learner counts: chn-pruned / dis-chn-pruned "
                                "flops, params or latency (a lookup table of per-layer timings on this machine); "
                                "the quantizers bits (weight bits); weight-sparse params; a composite A+B bitops "
                                "(MACs x weight bits x activation bits) or bytes (the weights' stored size); auto: "
                                "the learner's first")
    init: str | None = opt(None, "model to start from: a torchpocket model.pt (a baseline, or a compressed run's), "
                                 "or a plain state_dict file for --net")
    trust_checkpoint: bool = opt(False, "let --init read a whole model saved with torch.save(model) (unpickling it "
                                        "runs code from the file: only for files you trust)")
    device: str = opt("auto", "auto | cpu | cuda[:N]")
    seed: int = opt(0, "random seed (search, training, data order)")
    out_dir: str = opt("runs", "parent folder of run directories")
    quiet: bool = opt(False, "no progress bars or per-epoch lines")
    threads: int = opt(0, "CPU threads for torch (0 = torch's default)")


@dataclass
class DataConfig:
    data_dir: str | None = opt(None, "folder with the dataset files (default: the dataset's usual places)")
    val_size: int = opt(-1, "images carved from train for validation, fixed seed (-1 = dataset default: 5000)")
    num_workers: int = opt(4, "loader worker processes for on-disk datasets (ImageNet)")
    image_size: int = opt(0, "imagefolder / imagenet: images resized (shorter side) and centre-cropped to this "
                             "size (0 = the dataset's default: 32 / 224)")


@dataclass
class SearchConfig:
    episodes: int = opt(-1, "candidates to evaluate (-1 = 200 for a search, 1 with --hpo none / uniform)")
    ft_steps: int = opt(0, "fast fine-tuning steps per candidate, distilled from the original (0 = AMC: none)")
    ft_lr: float = opt(0.01, "learning rate of fast fine-tuning")
    reward: str = opt("acc", "acc: -error, resource-constrained | acc-flops / acc-params: -error*log(resource), "
                      "accuracy-guaranteed (may go below the target)", choices=("acc", "acc-flops", "acc-params"))
    reward_val_size: int = opt(2000, "validation images used to score each candidate (0 = the whole split)")
    retrain_epochs: int = opt(1, "epochs of re-training (with distillation) for the best candidate")
    retrain_lr: float = opt(0.01, "peak learning rate of the re-training (cosine-decayed; the baseline's is --lr)")
    policy: str | None = opt(None, "policy.yaml to apply with --hpo none (per-layer values)")
    storage: str | None = opt(None, "Optuna storage shared by workers: an RDB URL (sqlite:///search.db, "
                                    "postgresql://user@host/db, password from PGPASSWORD or ~/.pgpass) or "
                                    "journal:///path/search.log (Optuna's JournalStorage, for one machine)")
    study_name: str | None = opt(None, "Optuna study name in --storage (default: derived from the run settings)")
    final_only: bool = opt(False, "with --storage: no search, run the final stage on the best trial stored (when "
                                  "the worker that evaluated the last trial died)")
    heartbeat: int = opt(30, "with --storage on SQLite or PostgreSQL: seconds between a worker's heartbeats; a "
                             "trial with none for two intervals (its worker died) is failed and run again once by "
                             "a live worker (0 = off; journal:// storage has no heartbeat)")
    worker_wait: float = opt(3600.0, "with --storage: seconds a worker that has drawn its last trial waits for the "
                                     "other workers' trials to finish (running a dead worker's trial again) "
                                     "before the final stage")
    resume: str | None = opt(None, "run directory of a killed search: continue from its last finished trial")
    export_onnx: bool = opt(True, "write model.onnx and check it against PyTorch with ONNX Runtime")
    pareto: str | None = opt(None, "LO:HI: one multi-objective search for the whole accuracy-resource front, every "
                                   "candidate's resource in [LO, HI] (--target is then ignored); pareto.csv, "
                                   "pareto.png and the hypervolume in summary.json; no model until --pick")
    pick: str | None = opt(None, "R[,R...]: re-train, test and export the front's best point at resource <= R, "
                                 "each under <run>/pick-R/ (with --pareto, or --resume of a Pareto run: no new "
                                 "search)")
    latency_repeats: int = opt(20, "repeats for the latency figures in summary.json (median)", positive=True)


CORE_SECTIONS: dict[str, type] = {"run": RunConfig, "data": DataConfig, "train": TrainConfig, "search": SearchConfig}


def plugin_sections(*registries: Registry) -> dict[str, type]:
    """The config section of every registered class that declares one (``section`` + ``Config``).

    Two classes may share a section only with the same dataclass (the two quantizers share ``quant``)."""
    out: dict[str, type] = {}
    for reg in registries:
        for name in reg.names():
            cls = reg.get(name)
            section, config = getattr(cls, "section", None), getattr(cls, "Config", None)
            if section is None or config is None:
                continue
            if section in CORE_SECTIONS or out.get(section, config) is not config:
                raise ValueError(f"{reg.kind} {name!r} declares config section {section!r}, which another "
                                 "component already uses with other options")
            out[section] = config
    return out


#: every section of a config: the run's own, then the learners' and the optimizers' (from their registries)
SECTIONS: dict[str, type] = {**CORE_SECTIONS, **plugin_sections(LEARNERS, HPOS)}


def _all_sections() -> dict[str, type]:
    return SECTIONS


def default_config() -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(cls()) for name, cls in _all_sections().items()}


def flag_of(section: str, f: dataclasses.Field) -> str:
    """The field's command-line flag: its own, else ``--<name>`` (the run's sections) or ``--<section>-<name>``."""
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--{name}" if section in CORE_SECTIONS else f"--{section}-{name}"


def iter_fields() -> typing.Iterator[tuple[str, dataclasses.Field, Any]]:
    for section, cls in _all_sections().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield section, f, hints[f.name]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the field type ``tp``; ints are accepted for floats."""
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads on / off / yes / no as booleans; choices check the rest
            return "on" if value else "off"
    elif typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, list):
            return [coerce(v, inner, where) for v in value]
    else:
        return value
    raise UserError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def load_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"config file {path} does not parse as YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def merge(base: dict[str, dict[str, Any]], override: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """Merge a nested override into ``base`` after checking every key and value type."""
    sections = _all_sections()
    out = {k: dict(v) for k, v in base.items()}
    override = _moved_keys(override)
    for section, values in override.items():
        if values is None:  # a section whose keys are all commented out
            values = {}
        if section not in sections:
            raise UserError(f"{source}: unknown section {section!r}; valid sections: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise UserError(f"{source}: section {section!r} must be a mapping, got {type(values).__name__}")
        hints = typing.get_type_hints(sections[section])
        for key, value in values.items():
            if key not in hints:
                raise UserError(
                    f"{source}: unknown key {section}.{key}; valid keys in {section!r}: {', '.join(hints)}"
                )
            out[section][key] = coerce(value, hints[key], f"{source}: {section}.{key}")
    return out


def _moved_keys(override: dict[str, Any]) -> dict[str, Any]:
    """Keys an older torchpocket kept elsewhere, where they are now (a run's saved config.yaml stays resumable):
    ``chn.resource`` is ``run.resource``."""
    chn = override.get("chn")
    if not isinstance(chn, dict) or "resource" not in chn:
        return override
    out = {**override, "chn": {k: v for k, v in chn.items() if k != "resource"}}
    run = dict(out.get("run") or {})
    run.setdefault("resource", chn["resource"])
    out["run"] = run
    return out


def validate(cfg: dict[str, dict[str, Any]]) -> None:
    """Cross-field checks and choices; registries check the names."""
    from torchpocket.datasets import DATASETS
    from torchpocket.nets import check_net_name

    run = cfg["run"]
    LEARNERS.get(run["learner"]).resolve_resource(run["resource"])
    HPOS.get(run["hpo"])
    DATASETS.get(run["dataset"])
    if not run.get("init"):
        check_net_name(run["net"])
    t = run["target"]
    if not (0 < t <= 1):
        raise UserError(f"--target must be in (0, 1], got {t}")
    for section, f, _ in iter_fields():
        choices = f.metadata.get("choices")
        if choices and cfg[section][f.name] not in choices:
            raise UserError(f"{flag_of(section, f)} must be one of {', '.join(map(str, choices))}, "
                            f"got {cfg[section][f.name]!r}")
    for section, values in cfg.items():
        for key, value in values.items():
            nonneg = key in ("epochs", "episodes", "ft_steps", "retrain_epochs", "batch_size", "val_size")
            auto = key in ("episodes", "val_size")  # -1 means "the default for this run"
            if nonneg and isinstance(value, (int, float)) and value < (-1 if auto else 0):
                raise UserError(f"{section}.{key} must not be negative, got {value}")
    for section, f, _ in iter_fields():
        if f.metadata.get("positive") and section in cfg and cfg[section][f.name] <= 0:
            raise UserError(f"{flag_of(section, f)} must be positive, got {cfg[section][f.name]}")
    for key, where in (("threads", "run"), ("reward_val_size", "search"), ("ft_steps", "search"),
                       ("heartbeat", "search"), ("worker_wait", "search")):
        if cfg[where][key] < 0:
            raise UserError(f"--{key.replace('_', '-')} must not be negative, got {cfg[where][key]}")
    for name, cls in SECTIONS.items():  # a component's own cross-field checks (quant: --bits)
        check = getattr(cls, "check", None)
        if check is not None and name in cfg:
            check(cfg)
    _check_pareto(cfg)
    if cfg["data"]["val_size"] == 0 and LEARNERS.get(run["learner"]).searchable:
        raise UserError("--val-size 0 leaves nothing to score candidates on; the search needs a validation split")


def pareto_window(cfg: dict[str, Any]) -> tuple[float, float] | None:
    """``--pareto LO:HI`` as numbers (None for a single-target search)."""
    text = cfg["search"]["pareto"]
    if not text:
        return None
    parts = str(text).split(":")
    try:
        lo, hi = (float(v) for v in parts) if len(parts) == 2 else (math.nan, math.nan)
    except ValueError:
        lo = hi = math.nan
    if not (0 < lo < hi <= 1):
        raise UserError(f"--pareto must be LO:HI with 0 < LO < HI <= 1 (fractions of the resource), got {text!r}")
    return lo, hi


def pick_points(cfg: dict[str, Any]) -> list[float]:
    """``--pick R[,R...]`` as numbers, in the order given."""
    text = cfg["search"]["pick"]
    if not text:
        return []
    try:
        out = [float(v) for v in str(text).split(",")]
    except ValueError:
        out = [math.nan]
    if not all(0 < r <= 1 for r in out):
        raise UserError(f"--pick must be R[,R...] with each R in (0, 1] (a resource fraction), got {text!r}")
    return out


def _check_pareto(cfg: dict[str, Any]) -> None:
    window, picks = pareto_window(cfg), pick_points(cfg)
    if picks and window is None and not cfg["search"]["resume"]:
        raise UserError("--pick chooses points of a Pareto front: give --pareto LO:HI, or --resume a Pareto run")
    if window is None:
        return
    hpo = cfg["run"]["hpo"]
    if not HPOS.get(hpo).pareto:
        names = ", ".join(n for n in HPOS.names() if HPOS.get(n).pareto)
        raise UserError(f"--pareto searches a front with several targets at once: use --hpo {names} "
                        f"({hpo!r} searches one target)")
    if cfg["search"]["reward"] != "acc":
        raise UserError("--pareto trades accuracy against the resource itself: use it with --reward acc")
    if not LEARNERS.get(cfg["run"]["learner"]).searchable:
        raise UserError(f"--pareto needs a learner with a search (not {cfg['run']['learner']!r})")


def dump_yaml(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


def redacted(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config as it may be written to a file or printed: storage passwords masked."""
    from torchpocket.utils import redact_url

    out = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items()}
    if isinstance(out.get("search"), dict) and out["search"].get("storage"):
        out["search"]["storage"] = redact_url(out["search"]["storage"])
    return out
