#!/usr/bin/env python
"""Faults of parallel workers and interrupts, measured: workers that start together, a worker that dies, and
Ctrl-C / SIGTERM at several points of a run. Three tables, each part chosen with ``--parts``:

- ``race``: ``--workers`` processes open one fresh storage behind a barrier (the same instant), each asks and
  tells two trials of a ``tpe`` study; ``--reps`` repetitions on SQLite, on a journal file and, when
  ``--postgres URL`` (or ``$TORCHPOCKET_TEST_POSTGRES``) is given, on PostgreSQL (a fresh database per
  repetition). A repetition is clean when every worker worked and the trial numbers are exactly
  0..2 x workers - 1;
- ``dead``: three ``run.py --hpo tpe --storage sqlite:...`` workers share ``--budget`` trials with
  ``--heartbeat`` seconds; fault-free, and with worker 0 SIGKILLed right after scoring its second trial
  (``TORCHPOCKET_FAULT=trial-scored:2``). Wall time from start to the last worker's exit, median over
  ``--reps``, and the slots finished (every one once is the promise);
- ``signals``: a single ``run.py`` interrupted by SIGINT and by SIGTERM at 5 points (1st / 3rd / 5th trial
  logged, the re-train started, ``model.pt`` written), then ``--resume``: exit 130 with one stderr line,
  no ``summary.json`` before the resume, and after it the trial log exactly 0..episodes-1, no partial file.

    python benchmarks/workers.py --parts race dead signals --reps 10 --out benchmarks/workers.md
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import flag_line, md_table  # noqa: E402

from torchpocket import faults  # noqa: E402
from torchpocket.utils import atomic_write_text, machine_description  # noqa: E402

TINY = ["--dataset", "synthetic", "--net", "resnet20", "--learner", "chn-pruned", "--target", "0.5", "--device", "cpu",
        "--quiet", "--epochs", "1", "--no-export-onnx", "--reward-val-size", "64", "--latency-repeats", "2",
        "--calib-batches", "2", "--threads", "1"]


# ----------------------------------------------------------------------------- race


def race(args: argparse.Namespace, tmp: Path) -> list[list[Any]]:
    import multiprocessing as mp

    from tests.test_reliability import _worker  # the test's worker: open behind the barrier, ask and tell twice

    ctx = mp.get_context("spawn")
    kinds = ["sqlite", "journal"] + (["postgresql"] if args.postgres else [])
    rows = []
    for kind in kinds:
        clean, errors = 0, []
        for rep in range(args.reps):
            if kind == "sqlite":
                url = f"sqlite:///{tmp}/race{rep}.db"
            elif kind == "journal":
                url = f"journal://{tmp}/race{rep}.log"
            else:
                url = _fresh_pg(args.postgres, rep)
            barrier, out = ctx.Barrier(args.workers), ctx.Queue()
            procs = [ctx.Process(target=_worker, args=(url, "race", i, barrier, out))
                     for i in range(args.workers)]
            for p in procs:
                p.start()
            results = [out.get(timeout=300) for _ in procs]
            for p in procs:
                p.join(timeout=60)
            numbers = sorted(n for status, ns in results if status == "ok" for n in ns)
            errs = [r[1] for r in results if r[0] != "ok"]
            errors += errs
            clean += int(not errs and numbers == list(range(2 * args.workers)))
        rows.append([kind, args.workers, args.reps, f"{clean}/{args.reps}", len(errors),
                     "; ".join(sorted(set(errors)))[:200] or "–"])
        print(f"  race {kind}: {clean}/{args.reps} clean, {len(errors)} errors", flush=True)
    return rows


def _fresh_pg(base: str, rep: int) -> str:
    """A new database on the server of ``base`` (``createdb`` through SQLAlchemy), its URL."""
    import sqlalchemy

    name = f"race_{uuid.uuid4().hex[:8]}_{rep}"
    engine = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()
    return base.rsplit("/", 1)[0] + "/" + name


# ----------------------------------------------------------------------------- dead worker


def _start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *argv], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def dead(args: argparse.Namespace, tmp: Path, env: dict[str, str]) -> list[list[Any]]:
    import optuna

    rows = []
    for label, fault in (("fault-free", None), ("worker 0 killed after scoring its 2nd trial", "trial-scored:2")):
        walls, ok, codes = [], 0, []
        for rep in range(args.reps_dead):
            d = tmp / f"dead-{bool(fault)}-{rep}"
            d.mkdir()
            url, study = f"sqlite:///{d / 'search.db'}", f"dead-{rep}"
            argv = [*TINY, "--hpo", "tpe", "--episodes", str(args.budget), "--retrain-epochs", "0", "--storage", url,
                    "--study-name", study, "--heartbeat", str(args.heartbeat)]
            t0 = time.perf_counter()
            procs = [_start([*argv, "--seed", str(i), "--out-dir", str(d / f"w{i}")],
                            {**env, faults.ENV: fault} if fault and i == 0 else env, d / f"w{i}.log")
                     for i in range(3)]
            codes.append([p.wait(timeout=1800) for p in procs])
            walls.append(time.perf_counter() - t0)
            stored = optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)
            slots = sorted(t.system_attrs["retry_history"][0] if t.system_attrs.get("retry_history") else t.number
                           for t in stored if t.state == optuna.trial.TrialState.COMPLETE)
            summaries = list(d.glob("w*/*/summary.json"))
            ok += int(slots == list(range(args.budget)) and len(summaries) == 1)
            print(f"  dead {label} rep {rep}: exit codes {codes[-1]}, {walls[-1]:.1f}s, slots ok "
                  f"{slots == list(range(args.budget))}, summaries {len(summaries)}", flush=True)
        rows.append([label, args.budget, args.heartbeat, len(walls), f"{statistics.median(walls):.1f}",
                     f"{ok}/{len(walls)}", " ".join("/".join(map(str, c)) for c in codes)])
    free, killed = float(rows[0][4]), float(rows[1][4])
    rows.append(["difference", "", "", "", f"{killed - free:+.1f} ({(killed - free) / args.heartbeat:+.1f} "
                 "heartbeats)", "", ""])
    return rows


# ----------------------------------------------------------------------------- signals


def signals(args: argparse.Namespace, tmp: Path, env: dict[str, str]) -> list[list[Any]]:
    episodes = 6
    argv = [*TINY, "--hpo", "random", "--episodes", str(episodes), "--retrain-epochs", "3",
            "--max-steps-per-epoch", "4"]

    def trials(runs: Path) -> list[dict[str, Any]]:
        logs = list(runs.glob("*/trials.jsonl"))
        if not logs:
            return []
        out = []
        for ln in logs[0].read_text().splitlines():
            try:
                out.append(json.loads(ln))
            except json.JSONDecodeError:
                break
        return out

    def log_has(runs: Path, text: str) -> bool:
        logs = list(runs.glob("*/log.txt"))
        return bool(logs) and text in logs[0].read_text()

    points = {
        "1st trial logged": lambda r: len(trials(r)) >= 1,
        "3rd trial logged": lambda r: len(trials(r)) >= 3,
        "5th trial logged": lambda r: len(trials(r)) >= 5,
        "re-train started": lambda r: log_has(r, "best candidate"),
        "model.pt written": lambda r: bool(list(r.glob("*/model.pt"))),
    }
    rows = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        for name, pred in points.items():
            runs = tmp / f"sig-{sig.name}-{name.replace(' ', '_')}"
            # SIGINT back to its default in the child: a shell starts background jobs with SIGINT ignored, and
            # Python then installs no KeyboardInterrupt handler (Ctrl-C reaches a foreground run as this does)
            proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *argv, "--out-dir", str(runs)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            end = time.monotonic() + 600
            while not pred(runs) and proc.poll() is None and time.monotonic() < end:
                time.sleep(0.02)
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=300)
            lines = [ln for ln in err.splitlines() if ln.strip()]
            (run_dir,) = runs.iterdir()
            interrupted = proc.returncode == 130
            one_line = len(lines) == 1 and lines[0].startswith("torchpocket: interrupted") and "--resume" in lines[0]
            no_summary = not (run_dir / "summary.json").exists()
            kept = len(trials(runs))
            res = subprocess.run([sys.executable, str(ROOT / "run.py"), "--resume", str(run_dir), "--quiet"],
                                 env=env, capture_output=True, text=True, timeout=900)
            done = [t["trial"] for t in trials(runs)]
            consistent = (res.returncode == 0 and done == list(range(episodes)) and (run_dir / "summary.json").exists()
                          and not list(run_dir.glob("*.tmp*")))
            rows.append([sig.name, name, proc.returncode, "yes" if one_line else "no", "yes" if no_summary else "no",
                         kept, res.returncode, "yes" if consistent else "no"])
            print(f"  {sig.name} at {name}: exit {proc.returncode}, one line {one_line}, resume {res.returncode}, "
                  f"consistent {consistent}", flush=True)
            if not interrupted:
                print(f"    (the run ended with {proc.returncode} before the signal: stderr {err[-200:]!r})")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["race", "dead", "signals"], choices=("race", "dead", "signals"))
    ap.add_argument("--reps", type=int, default=10, help="race repetitions per storage (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=4, help="workers in a race (default: %(default)s)")
    ap.add_argument("--postgres", default=os.environ.get("TORCHPOCKET_TEST_POSTGRES"),
                    help="a PostgreSQL URL whose server may create databases (default: $TORCHPOCKET_TEST_POSTGRES)")
    ap.add_argument("--reps-dead", type=int, default=3, help="repetitions of each dead-worker case")
    ap.add_argument("--budget", type=int, default=12, help="trials of the dead-worker search (default: %(default)s)")
    ap.add_argument("--heartbeat", type=int, default=5, help="--heartbeat of the dead-worker search (default: 5)")
    ap.add_argument("--out", default=None, help="markdown file for the tables (they are printed too)")
    args = ap.parse_args()
    text = ["## Parallel workers and interrupts under faults", "",
            f"- machine: {machine_description()}; CPU flags: {flag_line()}",
            f"- command: `python benchmarks/workers.py {' '.join(sys.argv[1:])}`", ""]
    with tempfile.TemporaryDirectory(prefix="torchpocket-workers-") as d:
        tmp = Path(d)
        env = {**os.environ, "TORCHPOCKET_CACHE": str(tmp / "cache"), "PYTHONPATH": str(ROOT)}
        env.pop(faults.ENV, None)
        if "race" in args.parts:
            text += ["### Workers started at the same instant on a fresh storage", "",
                     md_table(["storage", "workers", "repetitions", "clean", "errors", "error messages"],
                              race(args, tmp)), ""]
        if "dead" in args.parts or "signals" in args.parts:  # the tiny baseline, trained once
            subprocess.run([sys.executable, str(ROOT / "run.py"), *TINY, "--hpo", "uniform", "--retrain-epochs", "0",
                            "--out-dir", str(tmp / "warm")], env=env, check=True, capture_output=True)
        if "dead" in args.parts:
            text += ["### One of three workers killed mid-trial (SQLite, Optuna heartbeat)", "",
                     md_table(["case", "budget", "heartbeat (s)", "repetitions", "median wall (s)",
                               "every slot once, one final stage", "exit codes per repetition"],
                              dead(args, tmp, env)), ""]
        if "signals" in args.parts:
            text += ["### Ctrl-C (SIGINT) and SIGTERM at five points, then --resume", "",
                     md_table(["signal", "when", "exit", "one stderr line", "no summary before resume",
                               "trials kept", "resume exit", "consistent after resume"],
                              signals(args, tmp, env)), ""]
    out = "\n".join(text) + "\n"
    print(out)
    if args.out:
        atomic_write_text(args.out, out)


if __name__ == "__main__":
    main()
