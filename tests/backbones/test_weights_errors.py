"""Unreadable weights files: a clear error naming the file and the fix, never the reader's own.

Every bad file below must raise :class:`WeightsFileError` (a ``ValueError``) whose message names
the file and says ``Fix:``; the message is one sentence about the file, not a safetensors, zip or
pickle error text, and it never suggests ``weights_only=False``.
"""

from __future__ import annotations

import json
import os
import random
import struct

import pytest
import torch
from safetensors.torch import save_file

from defectscope.backbones import load_weights_file, resolve_weights
from defectscope.backbones.weights import WeightsFileError


def _state():
    return {"a.weight": torch.arange(1000, dtype=torch.float32), "b.bias": torch.ones(10)}


def _torch_bytes(tmp_path, legacy=False) -> bytes:
    path = tmp_path / "source.pth"
    torch.save(_state(), path, _use_new_zipfile_serialization=not legacy)
    return path.read_bytes()


def _safetensors_bytes(tmp_path) -> bytes:
    path = tmp_path / "source.safetensors"
    save_file(_state(), str(path))
    return path.read_bytes()


def _framed(header: bytes, body: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors-like file: 8-byte little-endian header length, header, body."""
    return struct.pack("<Q", len(header) if length is None else length) + header + body


def _random(n: int) -> bytes:
    data = bytearray(random.Random(n).randbytes(n))
    data[0] = 0x17  # neither b"PK" (zip) nor b"\x80" (pickle), whatever the draw
    return bytes(data)


# name -> (file name, bytes from tmp_path, words the message must hold)
BAD_FILES = {
    "pth-empty": ("w.pth", lambda t: b"", "empty"),
    "pth-truncated-zip": ("w.pth", lambda t: _torch_bytes(t)[: len(_torch_bytes(t)) // 2], "truncated"),
    "pth-truncated-zip-to-10-bytes": ("w.pth", lambda t: _torch_bytes(t)[:10], "truncated"),
    "pth-truncated-legacy-pickle": ("w.pth", lambda t: _torch_bytes(t, legacy=True)[:-100], "truncated"),
    "pth-random-bytes": ("w.pth", lambda t: _random(4096), "not a torch weights file"),
    "pth-text-file": ("w.pth", lambda t: b"this is not a checkpoint\n" * 10, "not a torch weights file"),
    "pt-random-bytes": ("w.pt", lambda t: _random(100), "not a torch weights file"),
    "bin-one-byte": ("pytorch_model.bin", lambda t: b"x", "not a torch weights file"),
    "safetensors-empty": ("w.safetensors", lambda t: b"", "too short"),
    "safetensors-3-bytes": ("w.safetensors", lambda t: b"abc", "too short"),
    "safetensors-random-bytes": ("w.safetensors", lambda t: _random(4096), "larger than the file"),
    "safetensors-header-length-past-end": ("w.safetensors", lambda t: _framed(b"{}", length=10**6),
                                           "larger than the file"),
    "safetensors-header-length-huge": ("w.safetensors", lambda t: _framed(b"{}", length=2**64 - 1),
                                       "larger than the file"),
    "safetensors-header-invalid-json": ("w.safetensors", lambda t: _framed(b"{not json}"), "not valid JSON"),
    "safetensors-header-not-utf8": ("w.safetensors", lambda t: _framed(b"\xff\xfe\xfd"), "not valid JSON"),
    "safetensors-header-json-list": ("w.safetensors", lambda t: _framed(b"[1, 2]"), "JSON list"),
    "safetensors-truncated": ("w.safetensors", lambda t: _safetensors_bytes(t)[:-100], "truncated"),
    "safetensors-truncated-in-header": ("w.safetensors", lambda t: _safetensors_bytes(t)[:20],
                                        "larger than the file"),
    "safetensors-offsets-past-end": (
        "w.safetensors",
        lambda t: _framed(json.dumps({"a": {"dtype": "F32", "shape": [1000],
                                            "data_offsets": [0, 4000]}}).encode(), b"\0" * 8),
        "truncated"),
    "safetensors-bad-dtype": (
        "w.safetensors",
        lambda t: _framed(json.dumps({"a": {"dtype": "NOPE", "shape": [2], "data_offsets": [0, 8]}}).encode(),
                          b"\0" * 8),
        "not a readable safetensors file"),
    "safetensors-shape-does-not-match-bytes": (
        "w.safetensors",
        lambda t: _framed(json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode(),
                          b"\0" * 8),
        "not a readable safetensors file"),
    "safetensors-file-that-is-a-torch-zip": ("w.safetensors", lambda t: _torch_bytes(t), "safetensors"),
}


@pytest.mark.parametrize("case", list(BAD_FILES), ids=list(BAD_FILES))
def test_bad_weights_file_gives_a_clear_error(case, tmp_path):
    name, make, words = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(make(tmp_path))
    with pytest.raises(WeightsFileError) as info:
        load_weights_file(path)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(path) in message, message
    assert words in message, message
    assert "Fix:" in message, message
    assert "weights_only` set to `False`" not in message and "weights_only=False" not in message
    assert "This is an internal miniz error" not in message  # torch's long text, cut to its first sentence
    assert len(message.splitlines()) == 1, message


@pytest.mark.parametrize("case", ["pth-truncated-zip", "safetensors-header-invalid-json", "safetensors-random-bytes"])
def test_bad_weights_file_through_resolve_weights(case, tmp_path):
    """The backbone's --weights path reaches the same error."""
    name, make, _ = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(make(tmp_path))
    with pytest.raises(WeightsFileError, match="Fix:"):
        resolve_weights("resnet18", weights=path)


def test_whole_pickled_module_is_refused_with_the_state_dict_fix(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(WeightsFileError, match=r"model\.state_dict\(\)") as info:
        load_weights_file(path)
    assert "other than tensors" in str(info.value) and str(path) in str(info.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs file permissions (not root)")
def test_unreadable_file_names_it(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(_state(), path)
    path.chmod(0)
    try:
        with pytest.raises(WeightsFileError, match="cannot be read") as info:
            load_weights_file(path)
        assert str(path) in str(info.value)
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_good_files_still_load(tmp_path, legacy):
    torch.save(_state(), tmp_path / "w.pth", _use_new_zipfile_serialization=not legacy)
    save_file(_state(), str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        loaded = load_weights_file(tmp_path / name)
        assert set(loaded) == set(_state()) and torch.equal(loaded["a.weight"], _state()["a.weight"])
