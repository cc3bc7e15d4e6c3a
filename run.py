#!/usr/bin/env python
"""Thin entry point: the same as the ``torchpocket`` console script."""

from torchpocket.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
