"""Faults a user meets: passwords in storage URLs, ..."""

from __future__ import annotations

import pytest

from torchpocket.config import default_config, redacted
from torchpocket.utils import redact_url, unmask_url


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://alice:s3cret@db.example:5432/study", "postgresql://alice:***@db.example:5432/study"),
    ("postgresql+psycopg://alice:p@ss:w@rd@host/db", "postgresql+psycopg://alice:***@host/db"),
    ("postgresql://alice@host/db", "postgresql://alice@host/db"),
    ("sqlite:////tmp/search.db", "sqlite:////tmp/search.db"),
    (None, None),
])
def test_storage_passwords_are_masked(url: str | None, shown: str | None) -> None:
    assert redact_url(url) == shown
    if shown and "***" in shown:
        assert unmask_url(shown) == shown.replace(":***@", "@")  # the driver then reads PGPASSWORD / ~/.pgpass
    cfg = default_config()
    cfg["search"]["storage"] = url
    assert redacted(cfg)["search"]["storage"] == shown and cfg["search"]["storage"] == url  # a copy


def _worker(url: str, study: str, seed: int, barrier: object, out: object) -> None:
    from tests.hpo.test_optimizer_suite import flops_space
    from torchpocket.hpo import create_optimizer

    barrier.wait()  # every worker opens the fresh storage at the same instant
    try:
        opt = create_optimizer("tpe", flops_space(), seed=seed, total_trials=8, storage=url, study_name=study)
        numbers = []
        for _ in range(2):
            p = opt.ask()
            numbers.append(opt.last_number)
            opt.tell(p, -sum(p))
        out.put(("ok", numbers))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        out.put(("error", f"{type(e).__name__}: {e}"))


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_workers_started_together_on_a_fresh_storage_all_work(kind: str, tmp_path: object) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    for rep in range(2):
        url = f"sqlite:///{tmp_path}/s{rep}.db" if kind == "sqlite" else f"journal://{tmp_path}/s{rep}.log"
        barrier, out = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(url, "race", i, barrier, out)) for i in range(4)]
        for p in procs:
            p.start()
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert [r[0] for r in results] == ["ok"] * 4, results
        numbers = sorted(n for _, ns in results for n in ns)
        assert len(set(numbers)) == 8  # study-wide trial numbers: none handed out twice
