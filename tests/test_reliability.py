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
