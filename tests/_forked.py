"""``run.py`` as a real process, started in about a tenth of a second: children forked from a warm *zygote*.

A fresh ``python run.py`` spends most of a tiny test run importing torch, torchvision, scikit-learn, Optuna,
matplotlib and ONNX. The zygote is one helper process per test worker that imports all of that once, runs no
tensor op (the few idle threads those imports start hold no lock a child needs), and forks a child per
:func:`start`. The child sets
the environment, the working directory and its stdout / stderr files, then runs ``torchpocket.cli.main`` as
``run.py`` does and exits with its code. It is a process of its own: a signal (SIGTERM, SIGKILL) reaches only
it, and its exit status reads as :class:`subprocess.Popen`'s does (``-9`` for SIGKILL). Tests of the installed
console script, of ``torchrun`` and of a fresh interpreter keep using :mod:`subprocess`.

Run as a script, this file is the zygote: requests and replies are JSON lines on its stdin / stdout.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the zygote (run as a script)


def _preload() -> None:
    """Import what a run imports on use (measured with ``python -X importtime run.py ...``); compute nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import optuna  # noqa: F401
    import scipy.optimize  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import sqlalchemy.orm  # noqa: F401
    import torch._dynamo  # noqa: F401  (what any TorchDispatchMode, such as FlopCounterMode, imports on first use)
    import torch.utils.flop_counter  # noqa: F401
    import torchvision  # noqa: F401

    import torchpocket.cli  # noqa: F401
    import torchpocket.hpo  # noqa: F401
    import torchpocket.learners  # noqa: F401
    import torchpocket.pipeline  # noqa: F401


def _child(req: dict[str, Any]) -> None:
    """In the forked child: become ``run.py argv`` and exit with its code (never returns)."""
    import signal
    import traceback

    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ.clear()
        os.environ.update(req["env"])
        os.chdir(req["cwd"])
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.argv = [str(ROOT / "run.py"), *req["argv"]]
        from torchpocket.cli import main

        code = main(list(req["argv"]))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - what an uncaught exception does to run.py: a traceback, exit 1
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def _serve() -> None:
    sys.path.insert(0, str(ROOT))
    _preload()
    reply = sys.stdout
    print(json.dumps({"ready": os.getpid()}), file=reply, flush=True)
    children: set[int] = set()
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "spawn":
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(req)
            children.add(pid)
            print(json.dumps({"pid": pid}), file=reply, flush=True)
        elif req["op"] == "wait":  # the exit code (Popen's convention), or None if still running at the timeout
            end = time.monotonic() + float(req["timeout"])
            code = None
            while True:
                done, status = os.waitpid(req["pid"], os.WNOHANG)
                if done:
                    code = os.waitstatus_to_exitcode(status)
                    children.discard(req["pid"])
                    break
                if time.monotonic() >= end:
                    break
                time.sleep(0.02)
            print(json.dumps({"code": code}), file=reply, flush=True)
    import signal

    for pid in children:  # the test session is over (stdin closed): no run outlives it
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


# ----------------------------------------------------------------------------- the test side


class Child:
    """A forked ``run.py``: the part of :class:`subprocess.Popen` the tests use."""

    def __init__(self, zygote: _Zygote, pid: int, out: Path, err: Path) -> None:
        self._zygote, self.pid, self._out, self._err = zygote, pid, out, err
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.call({"op": "wait", "pid": self.pid, "timeout": 0})["code"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._zygote.call({"op": "wait", "pid": self.pid,
                                                 "timeout": 1e9 if timeout is None else timeout})["code"]
            if self.returncode is None:
                raise subprocess.TimeoutExpired(f"run.py (pid {self.pid})", timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the exit (unless it has exited), then its stdout and stderr."""
        self.wait(timeout)
        return self._out.read_text(errors="replace"), self._err.read_text(errors="replace")

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)


class _Zygote:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=str(ROOT))
        self.logs = Path(tempfile.mkdtemp(prefix="torchpocket-zygote-"))
        self.count = 0
        first = self.proc.stdout.readline()
        if not first:
            raise RuntimeError(f"the test zygote did not start (exit {self.proc.wait()})")
        atexit.register(self.close)

    def call(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BaseException:  # interrupted (a test's timeout): its reply would answer the next request
            self.proc.kill()
            raise
        if not line:
            raise RuntimeError(f"the test zygote died (exit {self.proc.poll()})")
        return json.loads(line)

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str | None) -> Child:
        self.count += 1
        out, err = self.logs / f"{self.count}.out", self.logs / f"{self.count}.err"
        pid = self.call({"op": "spawn", "argv": [str(a) for a in argv], "env": dict(env),
                         "cwd": cwd or os.getcwd(), "stdout": str(out), "stderr": str(err)})["pid"]
        return Child(self, pid, out, err)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_ZYGOTE: _Zygote | None = None


def start(argv: list[str], env: dict[str, str], *, cwd: str | None = None) -> Child:
    """``run.py argv`` in a process of its own, with exactly ``env`` as its environment."""
    global _ZYGOTE
    if _ZYGOTE is None or _ZYGOTE.proc.poll() is not None:
        _ZYGOTE = _Zygote()
    return _ZYGOTE.spawn(argv, env, cwd)


if __name__ == "__main__":
    _serve()
