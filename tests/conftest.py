"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest


@pytest.fixture
def empty_weight_caches(tmp_path, monkeypatch):
    """Point every weight cache at empty temporary folders, so tests never see (or fill) the
    machine's real torch hub / Hugging Face caches."""
    torch_home, hf_home = tmp_path / "torch_home", tmp_path / "hf_home"
    torch_home.mkdir()
    hf_home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return torch_home, hf_home
