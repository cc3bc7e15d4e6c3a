"""Fault injection for the reliability tests and ``benchmarks/faults.py``.

``TORCHPOCKET_FAULT=<point>:<n>`` makes the process kill itself with SIGKILL (``kill -9``: no handler, no
cleanup, no flush) the ``n``-th time it reaches ``<point>`` (``n`` defaults to 1). Unset, :func:`point` is one
dictionary lookup. The points (:data:`POINTS`) sit where a real kill would do the most harm: inside a trial,
half-way through a trial log line, between a checkpoint's temporary file and its rename, inside the re-train,
and during the export. ``TORCHPOCKET_FAULT_LOG=<file>`` appends the name of every point reached to that file
(one line each), so a benchmark can draw only visits a run really makes.
"""

from __future__ import annotations

import os
import signal

ENV = "TORCHPOCKET_FAULT"
LOG_ENV = "TORCHPOCKET_FAULT_LOG"

#: every named point; ``write:<file name>`` points exist for each file written atomically
POINTS = ("trial-start", "trial-scored", "trial-logged", "trials-line", "study-added", "write:search_state.pt",
          "train-step", "write:model.pt", "export", "write:summary.json", "write:report.md")

_seen: dict[str, int] = {}


def point(name: str) -> None:
    """SIGKILL this process if ``$TORCHPOCKET_FAULT`` names ``name`` and this is its ``n``-th visit."""
    log = os.environ.get(LOG_ENV)
    if log:
        with open(log, "a") as f:
            f.write(name + "\n")
    spec = os.environ.get(ENV)
    if not spec:
        return
    want, _, n = spec.rpartition(":")
    if not n.isdigit():  # no count: the first visit
        want, n = spec, "1"
    if want != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
