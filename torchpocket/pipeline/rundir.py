"""The run directory: its unique folder, ``log.txt`` (everything printed), JSON files written atomically, and the
trial log (``trials.jsonl`` for resume, ``trials.csv`` to read), flushed after every trial."""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import os
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchpocket import faults
from torchpocket.errors import Interrupted, RunCrashed, UserError
from torchpocket.utils import Tee, atomic_write_bytes, atomic_write_text


@dataclass
class RunDir:
    path: Path
    _files: list[Any] = field(default_factory=list)

    @classmethod
    def create(cls, cfg: dict[str, Any]) -> RunDir:
        run = cfg["run"]
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        net = (run["net"] or "model").replace(":", "-").replace("/", "-")
        name = f"{stamp}-{run['learner']}-{run['hpo']}-{net}-{run['dataset']}"
        root = Path(run["out_dir"])
        root.mkdir(parents=True, exist_ok=True)
        path, k = root / name, 1
        while True:
            try:
                path.mkdir()  # never reuse an existing directory
                break
            except FileExistsError:
                k += 1
                path = root / f"{name}-{k}"
        return cls(path)

    @contextlib.contextmanager
    def tee(self) -> Iterator[None]:
        """Everything printed also goes to log.txt; an unexpected error's traceback goes there only, and the
        error comes out as :class:`RunCrashed` (one line for the user, pointing at the log)."""
        log = open(self.path / "log.txt", "a", buffering=1)
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(out, log), Tee(err, log)  # type: ignore[assignment]
        try:
            yield
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI turns it into one): say how to go on
            done = len(TrialLog(self.path, []).read())
            raise Interrupted(str(self.path), done) from None
        except (UserError, SystemExit, RunCrashed, Interrupted):
            raise
        except Exception as e:  # noqa: BLE001 - a bug or an environment problem: keep the traceback, say where
            log.write("".join(traceback.format_exception(e)))
            raise RunCrashed(f"unexpected {type(e).__name__}: {' '.join(str(e).split())[:200]}",
                             log=str(self.path / "log.txt")) from None
        finally:
            sys.stdout, sys.stderr = out, err
            log.close()

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_text(self.path / name, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


class TrialLog:
    """trials.jsonl (the record resume reads) and trials.csv (one column per layer), flushed per trial."""

    FIELDS = ["trial", "optimizer", "kind", "status", "resource", "val_acc", "reward", "seconds", "reason"]

    def __init__(self, path: Path, layer_names: list[str]) -> None:
        self.jsonl, self.csv, self.names = path / "trials.jsonl", path / "trials.csv", layer_names

    def read(self) -> list[dict[str, Any]]:
        if not self.jsonl.exists():
            return []
        out = []
        for line in self.jsonl.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: the trial in flight, re-run on resume
        return out

    def rewrite(self, trials: list[dict[str, Any]]) -> None:
        atomic_write_text(self.jsonl, "".join(json.dumps(t) + "\n" for t in trials))
        with open(self.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self.FIELDS + self.names)
            for t in trials:
                w.writerow(self._row(t))

    def _row(self, t: dict[str, Any]) -> list[Any]:
        return [t.get(k, "") for k in self.FIELDS] + list(t["policy"])

    def append(self, t: dict[str, Any]) -> None:
        line = json.dumps(t) + "\n"
        with open(self.jsonl, "a") as f:
            f.write(line[: len(line) // 2])
            f.flush()
            faults.point("trials-line")  # a kill here leaves half a line, which read() drops
            f.write(line[len(line) // 2:])
            f.flush()
            os.fsync(f.fileno())
        new = not self.csv.exists()
        with open(self.csv, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(self.FIELDS + self.names)
            w.writerow(self._row(t))


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save`` to a temporary file renamed over ``path``: a kill leaves the old file or the new one."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
