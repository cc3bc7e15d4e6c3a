"""Command line: ``python run.py`` / ``torchpocket``. User errors become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Any, NoReturn

from torchpocket.errors import Interrupted, RunCrashed, UserError

MAIN_COMMAND = "python run.py --learner chn-pruned --hpo ddpg --target 0.5"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"torchpocket: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from torchpocket.config import default_config, flag_of, iter_fields

    defaults = default_config()
    p = _Parser(
        prog="torchpocket",
        description="Automated model compression: a learner turns a trained network and a per-layer policy into a "
        "compressed model; an optimizer searches the policy. Precedence: defaults < --config YAML < flags.",
        epilog=f"example: {MAIN_COMMAND}   (keep 50%% of the FLOPs)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", metavar="YAML", help="preset file (see configs/); flags override it")
    p.add_argument("--list", action="store_true", help="list every learner, optimizer, net and dataset, then exit")
    p.add_argument("--dashboard", metavar="RUN_DIR", help="serve a run's study.db with optuna-dashboard on "
                   "127.0.0.1 (pip install 'torchpocket[dashboard]'), then exit on Ctrl-C")
    p.add_argument("--dashboard-port", type=int, default=8080, metavar="PORT", help="port of --dashboard")
    groups: dict[str, Any] = {}
    for section, f, tp in iter_fields():
        g = groups.get(section) or groups.setdefault(section, p.add_argument_group(f"{section} options"))
        flag = flag_of(section, f)
        default = defaults[section][f.name]
        kw: dict[str, Any] = {
            "dest": f"{section}.{f.name}",
            "default": argparse.SUPPRESS,
            "help": f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%"),
        }
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction if default else "store_true", **kw)
            continue
        args = typing.get_args(tp)
        base = next((a for a in args if a is not type(None)), tp) if args else tp
        if typing.get_origin(base) is list:
            kw["nargs"] = "+"
            base = typing.get_args(base)[0]
        kw["type"] = base
        kw["metavar"] = f.name.upper()
        g.add_argument(flag, **kw)
    p.formatter_class = _HelpFormatter
    return p


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Defaults are already in each option's help text."""


def config_from_args(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from torchpocket.config import default_config, load_yaml, merge, validate

    cfg = default_config()
    if args.config:
        cfg = merge(cfg, load_yaml(args.config), args.config)
    overrides: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            overrides.setdefault(section, {})[name] = value
    cfg = merge(cfg, overrides, "command line")
    validate(cfg)
    if cfg["run"]["init"]:
        from torchpocket.learners.training import read_model_file

        kind, ckpt = read_model_file(cfg["run"]["init"], trust=cfg["run"]["trust_checkpoint"])
        saved = ckpt.get("net") if kind == "torchpocket" else None
        if saved and "run.net" in vars(args) and saved != cfg["run"]["net"]:
            raise UserError(
                f"--init {cfg['run']['init']} is a {saved} checkpoint, but --net {cfg['run']['net']} "
                "was given (drop --net: the architecture comes from the checkpoint)"
            )
        if saved:
            cfg["run"]["net"] = saved  # the run directory and config.yaml name the real net
    return cfg


def flags_markdown() -> str:
    """Every option as a markdown table per section (README's option reference is generated from this)."""
    from torchpocket.config import default_config, flag_of, iter_fields

    defaults = default_config()
    rows: dict[str, list[str]] = {}
    for section, f, _ in iter_fields():
        flag = flag_of(section, f)
        if defaults[section][f.name] is True:
            flag = f"{flag} / --no-{flag[2:]}"
        help_text = f.metadata.get("help", "").replace("|", "\\|")
        rows.setdefault(section, []).append(f"| `{flag}` | `{defaults[section][f.name]}` | {help_text} |")
    out = []
    for section, lines in rows.items():
        out += [
            f"**{section}** (YAML section `{section}:`)",
            "",
            "| flag | default | meaning |",
            "|---|---|---|",
            *lines,
            "",
        ]
    return "\n".join(out)


def print_list() -> None:
    from torchpocket.datasets import DATASETS
    from torchpocket.hpo import HPOS
    from torchpocket.learners import LEARNERS
    from torchpocket.nets import NETS

    for title, reg in (("learners", LEARNERS), ("optimizers", HPOS), ("nets", NETS), ("datasets", DATASETS)):
        print(f"{title}:")
        for name in reg.names():
            print(f"  {name:<18} {reg.doc(name)}")
        if title == "learners":
            from torchpocket.learners.composite import composite_names

            print(f"  {'A+B':<18} joint search, one policy and one budget (--resource bitops | bytes): "
                  + ", ".join(composite_names()))
        if title == "nets":
            print(
                f"  {'tv:<name>':<18} any torchvision classification model, random init "
                "(e.g. tv:resnet18, tv:mobilenet_v2)"
            )


def _sigterm_as_interrupt() -> None:
    """SIGTERM (a job scheduler, ``kill``) stops a run like Ctrl-C: consistent files, a resume line, exit 130."""
    import signal
    import threading

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    _sigterm_as_interrupt()
    try:
        args = build_parser().parse_args(argv)
        if args.list:
            print_list()
            return 0
        if args.dashboard:
            from torchpocket.pipeline.studylog import dashboard

            dashboard(args.dashboard, port=args.dashboard_port)
            return 0
        cfg = config_from_args(args)
        from torchpocket.pipeline import run

        run(cfg)
        return 0
    except UserError as e:
        print(f"torchpocket: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except RunCrashed as e:
        print(f"torchpocket: error: {e}; the traceback is in {e.log}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:
        print(f"torchpocket: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before a run directory exists
        print("torchpocket: interrupted before the run started; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
