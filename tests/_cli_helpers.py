"""Shared by the command-line tests (imported by name, like tests/engine/_engine_helpers)."""

from __future__ import annotations

import csv

import pytest
import torch

from defectscope.cli import main


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """torch on one thread: on a small shared CPU, OpenMP threads that wait for each other make
    tiny tensor ops tens of times slower than one thread does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """Relative defaults (results/, predictions/) must never land in the repository."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")


def run_cli(argv: list) -> int:
    """``main(argv)`` as a process would end: its return value, or the SystemExit status."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as err:
        if err.code is None:
            return 0
        return err.code if isinstance(err.code, int) else 1


def read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
