"""Shared helpers of the benchmark scripts (``ablation.py``, ``chn_pruned.py``, ``weight_sparse.py``; not a benchmark).

The scripts run every configuration in one process through the library's own pipeline functions
(``load_data``, ``resolve_baseline``, ``make_learner``, ``search``): the data and the baseline are
loaded once, and one learner (``chn-pruned`` unless a script names another) per (seed, learner
options) is prepared (calibrated) once and reused by every optimizer and target of that seed: searches run with
``pipeline.search(..., prepare=False)``, which gives the same candidates (``prepare`` is deterministic in
the learner's seed) without re-sampling the calibration feature maps or re-computing the cached LASSO paths.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import io
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchpocket.config import default_config, validate
from torchpocket.datasets import DataBundle, TensorLoader
from torchpocket.errors import UserError
from torchpocket.hpo import HPOS
from torchpocket.learners.training import evaluate
from torchpocket.pipeline import SearchResult, load_data, make_learner, resolve_baseline, search
from torchpocket.pipeline import reward_loader as pipeline_reward_loader
from torchpocket.pipeline.final import retrain
from torchpocket.profile import profile_model
from torchpocket.utils import machine_description, resolve_device, seed_everything

LEARNER = "chn-pruned"


# ----------------------------------------------------------------------------- command line


def add_common_args(ap: argparse.ArgumentParser, *, optimizers: Sequence[str], targets: Sequence[float]) -> None:
    """The options both benchmarks share (same names as ``run.py`` where they mean the same)."""
    ap.add_argument("--net", default="resnet20", help="network (default: %(default)s)")
    ap.add_argument("--dataset", default="fashion-mnist", help="dataset (default: %(default)s)")
    ap.add_argument("--data-dir", default=None, help="folder with the dataset files (default: the usual places)")
    ap.add_argument("--init", default=None,
                    help="baseline checkpoint (default: the shipped benchmarks/<net>-<dataset>.pt, else a cached "
                         "or newly trained baseline, as run.py does)")
    ap.add_argument("--targets", type=float, nargs="+", default=list(targets),
                    help="FLOPs to keep, fractions of the baseline's (default: %(default)s)")
    ap.add_argument("--optimizers", nargs="+", default=list(optimizers),
                    help="optimizers (--hpo names), in table order (default: %(default)s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="seeds; every figure is mean +- std over them (default: %(default)s)")
    ap.add_argument("--episodes", type=int, default=30,
                    help="candidates per search (uniform always evaluates its one policy once; "
                         "default: %(default)s, the CPU preset's)")
    ap.add_argument("--retrain-epochs", type=int, default=1,
                    help="epochs of distilled re-training of each best candidate (default: %(default)s)")
    ap.add_argument("--retrain-steps", type=int, default=0,
                    help="cap on steps per re-training epoch, the same for every row (0 = whole epoch)")
    ap.add_argument("--retrain-lr", type=float, default=None,
                    help="peak learning rate of the re-training (default: the pipeline's --retrain-lr)")
    ap.add_argument("--reward-val-size", type=int, default=2000,
                    help="validation images scoring each candidate (0 = the whole split; default: %(default)s)")
    ap.add_argument("--channel-round", type=int, default=1,
                    help="keep a multiple of this many channels in every pruned layer (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N] | auto (default: %(default)s)")
    ap.add_argument("--out", default=None, help="markdown file for the tables (they are printed too)")
    ap.add_argument("--plot", default=None, help="PNG file for the plot (torchpocket.report.plot_ablation)")
    ap.add_argument("--verbose", action="store_true", help="the pipeline's own progress bars and lines")


def check_args(args: argparse.Namespace) -> None:
    """Reject bad values with one line (a :class:`UserError`) before any data or model is touched."""
    for name in args.optimizers:
        HPOS.get(name)  # an unknown name lists the valid ones
    if len(set(args.optimizers)) != len(args.optimizers):
        raise UserError(f"--optimizers lists a name twice: {' '.join(args.optimizers)}")
    if not args.seeds:
        raise UserError("--seeds needs at least one seed")
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds lists a seed twice: {args.seeds}")
    for t in args.targets:
        if not 0 < t <= 1:
            raise UserError(f"--targets must be in (0, 1], got {t}")
    for flag in ("episodes", "channel_round"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in ("retrain_epochs", "retrain_steps", "reward_val_size", "threads"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must not be negative, got {getattr(args, flag)}")


def main_guard(main: Callable[[], None]) -> None:
    """Run ``main``; bad input is one line on stderr and exit code 2, as ``run.py`` does."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def command_line() -> str:
    return shlex.join(["python", sys.argv[0], *sys.argv[1:]])


def flag_line() -> str:
    """``avx2 yes, avx512f no, ...``: the x86 CPU features fp32 and int8 kernels depend on, beside speed figures."""
    from torchpocket.utils import cpu_flags

    return ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu_flags().items()
                     if k in ("avx2", "avx512f", "avx512_vnni", "avx_vnni"))


def header(title: str, bench: Bench) -> str:
    """Machine, threads, baseline and the exact command, so the README can cite where a table came from."""
    a = bench.args
    budget = (f"{a.retrain_epochs} epoch(s)" + (f" x at most {a.retrain_steps} steps" if a.retrain_steps else "")
              + ", distilled from the baseline" if a.retrain_epochs else "none")
    return "\n".join([
        f"## {title}",
        "",
        f"- machine: {machine_description()}, device {bench.device}; {_dt.date.today().isoformat()}",
        f"- CPU flags: {flag_line()}",
        f"- command: `{command_line()}`",
        f"- baseline: {bench.source} ({bench.net} on {bench.data.name}), test acc {bench.base_test:.2f}%, "
        f"{bench.base_flops / 1e6:.2f} MFLOPs; baseline val acc on the reward split "
        f"({bench.reward_size} images) {bench.base_val:.2f}%",
        f"- seeds {' '.join(map(str, a.seeds))} (mean ± sample std); {a.episodes} candidates per search; "
        f"re-training: {budget}",
        "",
        "",
    ])


# ----------------------------------------------------------------------------- statistics and tables


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [float(x) for x in xs]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def pm(xs: Sequence[float], digits: int = 2) -> str:
    """``mean ± std`` over seeds (just the value with one seed)."""
    m, s = mean_std(xs)
    if math.isnan(m):
        return "–"
    return f"{m:.{digits}f}" if len(xs) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, right: Sequence[bool] | None = None) -> str:
    right = right if right is not None else [i > 0 for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def accuracy_table(bench: Bench, runs: dict[tuple[float, str], list[Run]], *, first: str,
                   label: Callable[[float], str] = lambda t: f"{t:g}") -> str:
    """Per target: each optimizer's val acc before fine-tuning and test acc after re-training (PocketFlow's shape)."""
    a = bench.args
    head = [first]
    for name in a.optimizers:
        head += [f"`{name}`: val, no FT", f"`{name}` + re-train: test"]
    rows = []
    for t in a.targets:
        row = [label(t)]
        for name in a.optimizers:
            rs = runs[(t, name)]
            row += [pm([r.val_acc for r in rs]), pm([r.test_acc for r in rs])]
        rows.append(row)
    return md_table(head, rows)


def emit(text: str, out: str | None, *, first: bool) -> None:
    """Print ``text`` and append it to ``out`` (``first`` starts the file afresh)."""
    print(text, flush=True)
    if out:
        p = Path(out)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "w" if first else "a") as f:
            f.write(text + "\n")


# ----------------------------------------------------------------------------- the benchmark state


@dataclass
class Run:
    """One search and what became of its best candidate."""

    optimizer: str
    target: float
    seed: int
    result: SearchResult
    val_acc: float  # the best candidate's val acc on the reward split (reconstruction, no fine-tuning)
    test_acc: float = float("nan")  # after the re-training budget, read once
    flops_kept: float = float("nan")
    params_kept: float = float("nan")
    retrain_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # what a benchmark records beside (sizes, ...)

    @property
    def candidate_seconds(self) -> list[float]:
        return [float(t["seconds"]) for t in self.result.trials]


@dataclass
class Bench:
    args: argparse.Namespace
    cfg: dict[str, Any]
    device: torch.device
    data: DataBundle
    base: nn.Module
    source: str
    net: str
    base_flops: float
    base_params: float
    base_val: float
    base_test: float
    reward_size: int
    learners: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    prepare_s: dict[tuple[Any, ...], float] = field(default_factory=dict)
    learner_name: str = LEARNER
    section: str = "chn"  # the learner's config section: the options ``learner(seed, **opts)`` may vary

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.data.in_channels, self.data.image_size, self.data.image_size)

    def config(self, *, hpo: str, seed: int, target: float, episodes: int, **chn: Any) -> dict[str, Any]:
        cfg = copy.deepcopy(self.cfg)
        cfg["run"].update(learner=self.learner_name, hpo=hpo, seed=seed, target=target)
        cfg["search"]["episodes"] = episodes
        opts = self._chn(chn)
        if "resource" in opts:  # --resource is the run's (what --target constrains), the rest the learner's
            cfg["run"]["resource"] = opts.pop("resource")
        cfg[self.section].update(opts)
        return cfg

    def _chn(self, chn: dict[str, Any]) -> dict[str, Any]:
        """Learner options (and ``resource``) that differ from the benchmark's defaults (so equal learners share
        one key)."""
        known = {**self.cfg[self.section], "resource": self.cfg["run"]["resource"]}
        for k in chn:
            if k not in known:
                raise UserError(f"unknown {self.learner_name} option {k!r}; valid: {', '.join(known)}")
        return {k: v for k, v in chn.items() if known[k] != v}

    def learner(self, seed: int, **chn: Any) -> Any:
        """The prepared learner for ``seed`` and these options (built and calibrated on first use)."""
        chn = self._chn(chn)
        key = (seed, *sorted(chn.items()))
        if key not in self.learners:
            cfg = self.config(hpo="none", seed=seed, target=1.0, episodes=1, **chn)
            learner = make_learner(cfg, self.device)
            t0 = time.perf_counter()
            learner.prepare(self.base, self.data)
            if self.learner_name == LEARNER:
                self._warm(learner, chn.get("channel_round", self.cfg["chn"]["channel_round"]))
            self.prepare_s[key] = time.perf_counter() - t0
            self.learners[key] = learner
        return self.learners[key]

    def _warm(self, learner: Any, channel_round: int) -> None:
        """Compress once at the largest ratios below 1, so the selection caches the learner fills lazily
        (LASSO paths, computed as far as a candidate needs) are complete before any search is timed:
        otherwise whichever optimizer ran first for a seed would pay for them."""
        space = learner.search_space(self.base, 1.0)
        policy = [min(spec.high, max(spec.low, (spec.in_channels - channel_round) / spec.in_channels))
                  for spec in space.layers]
        learner.compress(self.base, policy)

    def search(self, optimizer: str, *, seed: int, target: float, **chn: Any) -> Run:
        """One search (``uniform``: its one policy, evaluated once) with the shared, prepared learner."""
        episodes = 1 if optimizer == "uniform" else self.args.episodes
        cfg = self.config(hpo=optimizer, seed=seed, target=target, episodes=episodes, **chn)
        learner = self.learner(seed, **chn)
        seed_everything(seed)
        with contextlib.nullcontext() if self.args.verbose else contextlib.redirect_stdout(io.StringIO()):
            result = search(learner, self.base, self.data, cfg, run_dir=None, device=self.device, prepare=False)
        return Run(optimizer, target, seed, result, val_acc=result.best_val_acc)

    def retrain_and_test(self, run: Run, *, after: Callable[[nn.Module, Run], None] | None = None,
                         **chn: Any) -> Run:
        """The best policy -> compress -> the re-training budget (distilled) -> test accuracy, read once.

        ``after(model, run)``: called with the re-trained model (e.g. to export it and record its size)."""
        learner = self.learner(run.seed, **chn)
        seed_everything(run.seed)
        with contextlib.nullcontext() if self.args.verbose else contextlib.redirect_stdout(io.StringIO()):
            final, _, _, run.retrain_s = retrain(learner, self.base, run.result.best_policy, self.data,
                                                 epochs=self.args.retrain_epochs, lr=self.cfg["search"]["retrain_lr"],
                                                 device=self.device)
        run.test_acc = evaluate(final, self.data.loader("test", batch_size=500), device=self.device)
        prof = profile_model(final, self.input_shape)
        run.flops_kept, run.params_kept = prof.flops / self.base_flops, prof.params / self.base_params
        if after is not None:
            after(final, run)
        return run

    def reward_loader(self) -> Any:
        """The validation images that score each candidate (the same ones ``pipeline.search`` uses)."""
        return reward_loader(self.data, self.cfg["search"]["reward_val_size"])

    def reward_acc(self, model: nn.Module) -> float:
        return evaluate(model, self.reward_loader(), device=self.device)


def reward_loader(data: DataBundle, size: int) -> Any:
    """The pipeline's own reward split (the first ``size`` validation images)."""
    return pipeline_reward_loader(data, size)[0]


def base_config(args: argparse.Namespace, learner: str = LEARNER) -> dict[str, Any]:
    cfg = default_config()
    cfg["run"].update(learner=learner, hpo="none", net=args.net, dataset=args.dataset, init=args.init,
                      device=args.device, quiet=not args.verbose, threads=args.threads, target=0.5)
    cfg["data"]["data_dir"] = args.data_dir
    cfg["search"].update(reward_val_size=args.reward_val_size, retrain_epochs=args.retrain_epochs,
                         export_onnx=False)
    if args.retrain_lr is not None:
        cfg["search"]["retrain_lr"] = args.retrain_lr
    cfg["train"]["max_steps_per_epoch"] = args.retrain_steps
    cfg["chn"]["channel_round"] = args.channel_round
    return cfg


def setup(args: argparse.Namespace, *, learner: str = LEARNER, section: str = "chn") -> Bench:
    """Validate, then load the data and the baseline once (``learner``: whose options live in ``section``)."""
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = base_config(args, learner)
    validate(cfg)
    device = resolve_device(args.device)
    seed_everything(0)
    data = load_data(cfg)
    base, info = resolve_baseline(cfg, data, device)  # may rename run.net after the --init checkpoint
    base.to(device).eval()
    base.to(memory_format=torch.contiguous_format)
    shape = (data.in_channels, data.image_size, data.image_size)
    prof = profile_model(base, shape)
    bench = Bench(args=args, cfg=cfg, device=device, data=data, base=base, source=short_path(info["source"]),
                  net=cfg["run"]["net"], base_flops=float(prof.flops), base_params=float(prof.params),
                  base_val=float("nan"), base_test=float("nan"), reward_size=0, learner_name=learner,
                  section=section)
    loader = bench.reward_loader()
    bench.reward_size = len(loader.y) if isinstance(loader, TensorLoader) else len(data.val)
    bench.base_val = evaluate(base, loader, device=device)
    bench.base_test = evaluate(base, data.loader("test", batch_size=500), device=device)  # read once
    return bench


def short_path(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def progress_line(run: Run) -> str:
    ok = [t for t in run.result.trials if t.get("status") == "ok"]
    return (f"  {run.optimizer:>10} target {run.target:.2f} seed {run.seed}: best val {run.val_acc:.2f}% "
            f"({len(ok)}/{len(run.result.trials)} ok, search {run.result.seconds:.1f}s)"
            + (f", test {run.test_acc:.2f}% after {run.retrain_s:.1f}s re-training" if not math.isnan(run.test_acc)
               else ""))
