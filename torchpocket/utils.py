"""Small shared helpers: device choice, seeding, progress bars that stay line-oriented off a terminal, log tee."""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TextIO, TypeVar

import numpy as np
import torch

from torchpocket.errors import UserError

K = TypeVar("K")
T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when there is one; ``cuda`` without CUDA is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but this machine has no CUDA device; use --device cpu or auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def is_main_process() -> bool:
    return (
        not torch.distributed.is_available()
        or not torch.distributed.is_initialized()
        or (torch.distributed.get_rank() == 0)
    )


class _LineProgress:
    """Progress for pipes and log files: one line every ``every`` seconds and at the end, no carriage returns."""

    def __init__(self, it: Iterable[T] | None, total: int | None, desc: str, every: float = 30.0) -> None:
        self.it, self.total, self.desc, self.every = it, total, desc, every
        self.n, self.postfix, self.start, self.last = 0, "", time.monotonic(), time.monotonic()

    def __iter__(self) -> Iterator[Any]:
        assert self.it is not None
        for x in self.it:
            yield x
            self.update()
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.every:
            self._print()

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, s: str) -> None:
        self.desc = s

    def _print(self) -> None:
        self.last = time.monotonic()
        total = f"/{self.total}" if self.total else ""
        print(
            f"{self.desc}: {self.n}{total} [{self.last - self.start:.0f}s] {self.postfix}", file=sys.stderr, flush=True
        )

    def close(self) -> None:
        if self.n:
            self._print()
            self.n = 0

    def __enter__(self) -> _LineProgress:
        return self

    def __exit__(self, *a: object) -> None:
        self.close()


class _NoProgress(_LineProgress):
    def _print(self) -> None:
        pass


def progress(
    it: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", quiet: bool = False, leave: bool = True
) -> Any:
    """tqdm on a terminal, a periodic plain line otherwise, nothing with ``quiet`` or off rank 0."""
    if quiet or not is_main_process():
        return _NoProgress(it, total, desc)
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(it, total=total, desc=desc, leave=leave, dynamic_ncols=True)
    return _LineProgress(it, total, desc)


class Tee:
    """Write to a stream and to a log file; the file gets final lines only (tqdm's carriage returns dropped)."""

    def __init__(self, stream: TextIO, log: TextIO) -> None:
        self.stream, self.log, self._buf = stream, log, ""

    def write(self, s: str) -> int:
        self.stream.write(s)
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self.log.write(line.rsplit("\r", 1)[-1] + "\n")
        self.log.flush()
        return len(s)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``data`` to a temporary file beside ``path``, synced, then renamed over it: a kill leaves the old file or
    the new one (and at worst a ``.tmp<pid>`` file, which ``--resume`` removes)."""
    from torchpocket import faults

    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    faults.point(f"write:{os.path.basename(path)}")
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def machine_description() -> str:
    """CPU model, core count and torch threads (for benchmark tables and summary.json)."""
    import platform

    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}"


def _proc_kib(path: str, key: str) -> int | None:
    try:
        for line in open(path):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_headroom_bytes(env: str = "TORCHPOCKET_GRAPH_MEMORY_GIB") -> int | None:
    """How much more memory one bounded step may take: ``$env`` GiB if set, else 3/4 of what is available now.

    None where the machine does not say (no ``/proc``): the step then runs unbounded.
    """
    if os.environ.get(env):
        try:
            return max(1, int(float(os.environ[env]) * 2**30))
        except ValueError:
            raise UserError(f"{env} must be a number of GiB, got {os.environ[env]!r}") from None
    avail = _proc_kib("/proc/meminfo", "MemAvailable")
    return None if avail is None else int(avail * 1024 * 0.75)


class MemoryCap:
    """Cap this process's address space at its size now plus ``extra`` bytes while the block runs (Linux).

    A runaway allocation then raises MemoryError in Python, which the caller turns into a one-line
    refusal, instead of growing until the kernel's OOM killer ends the process with no message.
    ``hit`` says whether the block ran out. Elsewhere (no ``resource`` module or ``/proc``) it does nothing.
    """

    def __init__(self, extra: int | None) -> None:
        self.extra, self.hit, self._old = extra, False, None

    def __enter__(self) -> MemoryCap:
        try:
            import resource
        except ImportError:
            return self
        size = _proc_kib("/proc/self/status", "VmSize")
        if self.extra is None or size is None:
            return self
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = size * 1024 + self.extra
        if soft != resource.RLIM_INFINITY:
            cap = min(cap, soft)
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        self._old = (soft, hard)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self._old is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, self._old)
        self.hit = kind is MemoryError or (kind is RuntimeError and "alloc" in str(exc).lower())


SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "sve")


def cpu_flags() -> dict[str, bool]:
    """The CPU features int8 and fp32 kernels depend on (``/proc/cpuinfo``; all False where it is unreadable)."""
    found: set[str] = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("flags", "Features")):
                found = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {f: f in found for f in SPEED_FLAGS}


def time_round_robin(calls: Mapping[K, Callable[[], Any]], *, warmup: int, repeats: int,
                     sync: Callable[[], None] | None = None) -> dict[K, float]:
    """Median seconds per call of each zero-argument callable, timed round-robin in one process.

    Every repeat times each callable once and the order rotates from repeat to repeat, so a slow patch
    on a shared machine slows all of them alike and the ratios between the medians stay fair. ``sync``
    (e.g. ``torch.cuda.synchronize``) runs before and after each timed call.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    names = list(calls)
    for _ in range(warmup):
        for k in names:
            calls[k]()
    times: dict[K, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        shift = r % len(names) if names else 0
        for k in names[shift:] + names[:shift]:
            if sync is not None:
                sync()
            start = time.perf_counter()
            calls[k]()
            if sync is not None:
                sync()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(t) for k, t in times.items()}


MASK = "***"


def redact_url(url: str | None) -> str | None:
    """``scheme://user:password@host/db`` with the password replaced by ``***`` (anything else unchanged)."""
    if not url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    auth, at, host = rest.rpartition("@")
    if not at or ":" not in auth:
        return url
    user = auth.split(":", 1)[0]
    return f"{scheme}://{user}:{MASK}@{host}"


def unmask_url(url: str | None) -> str | None:
    """A URL whose password was redacted, without it: the driver then reads ``PGPASSWORD`` or ``~/.pgpass``."""
    if not url or f":{MASK}@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    auth, _, host = rest.rpartition("@")
    return f"{scheme}://{auth.split(':', 1)[0]}@{host}"
