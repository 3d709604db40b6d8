"""Model files that are safe to open: JSON metadata, tensors loaded weights-only.

A trained model is two files in ``models/<n>/``:

- ``params.json``: everything needed to rebuild it (model name, constructor arguments,
  pre-processing, threshold and where it came from, the data it was trained on), plain JSON
  with a format version that is checked on load;
- ``ckpt.pth``: the trained tensors, read with ``torch.load(weights_only=True)``, which
  refuses any pickled object that is not a tensor or a plain container.

Opening either never runs code. Models saved before the JSON format (``params.pkl``) are read
through :class:`PlainDataUnpickler`, which allows plain data types only, so a crafted pickle is
refused before it can import anything.

Every problem with a file raises :class:`ModelFileError` naming the file, the problem and the fix.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

CKPT_NAME = "ckpt.pth"
PARAMS_NAME = "params.json"
LEGACY_PARAMS_NAME = "params.pkl"
TRAINING_STATE_NAME = "last.ckpt"
FORMAT_NAME = "defectscope-model"
#: Version 1: params.pkl (pickle). Version 2: params.json.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


class ModelFileError(ValueError):
    """A model or training-state file that cannot be used: missing, corrupt, of another model
    or format version, or holding something other than plain data."""


def _show(path: Path) -> str:
    return str(path) if path.is_absolute() else f"{path} (resolved: {Path.cwd() / path})"


# ---- writing ------------------------------------------------------------------------------
def to_plain(value: Any, where: str = "params") -> Any:
    """``value`` as JSON-ready data: tuples become lists, numpy / torch scalars become numbers.

    Raises TypeError for anything else, so a model that keeps a non-plain setting fails when it
    is saved (a bug), not when someone later opens the file."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        # Strict JSON has no NaN / inf: an undefined number (an escape rate without defects) is null.
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): to_plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return to_plain(value.item(), where)
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return to_plain(value.item(), where)
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"{where} holds a {type(value).__name__}, which a JSON model file cannot store")


def remove_orphan_temporaries(folder: Path, name: str | None = None) -> list[Path]:
    """Delete ``<name>.*.tmp`` files (all ``*.tmp`` when ``name`` is None) left in ``folder``
    by a write that was killed before its rename; returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f"{name}.*.tmp" if name else "*.tmp"
    removed = []
    for path in folder.glob(pattern):
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(binary_file)`` on a temporary file in the same folder, then rename it over
    ``path``: a crash never leaves a half-written file where a good one was. Temporaries left
    by an earlier killed write of the same file are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphan_temporaries(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` as strict JSON (see :func:`to_plain`), atomically."""
    text = json.dumps(to_plain(obj), indent=2, allow_nan=False)
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def write_params(path: str | Path, params: dict[str, Any]) -> None:
    """Write ``params`` as ``params.json`` (atomically), stamped with the format and version."""
    write_json(path, {"format": FORMAT_NAME, **params, "format_version": FORMAT_VERSION})


# ---- reading ------------------------------------------------------------------------------
class PlainDataUnpickler(pickle.Unpickler):
    """Reads pickles of plain data only (dict, list, tuple, str, bytes, numbers, bool, None).

    Those need no import, so every request to import something (``find_class``), which is how
    a crafted pickle reaches ``os.system`` or any other callable, is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it asks to import {module}.{name}; a model file may hold plain data only")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds persistent references; a model file may hold plain data only")


def _corrupt(path: Path, what: str, err: BaseException) -> ModelFileError:
    """The error for a file that cannot be read at all (cut short, overwritten, random bytes)."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelFileError(
        f"{what.capitalize()} file {_show(path)} is truncated or corrupt ({type(err).__name__}: {message}). "
        "Fix: copy the model folder again from its source, or retrain the model."
    )


def _read_legacy_params(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            params = PlainDataUnpickler(fh).load()
    except pickle.UnpicklingError as err:
        raise ModelFileError(
            f"Refused {_show(path)}: {err}. It was not written by defectscope, or was altered, and "
            "opening it could run code. Fix: use a model file from a source you trust, or retrain "
            "the model (current versions write params.json)."
        ) from err
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, MemoryError, OverflowError) as err:
        raise _corrupt(path, "Settings", err) from err
    if not isinstance(params, dict):
        raise ModelFileError(f"{_show(path)} holds a {type(params).__name__}, not model settings. Fix: retrain the model.")
    params.setdefault("format_version", 1)
    return params


def read_params(folder: str | Path) -> dict[str, Any]:
    """The model settings in ``folder``: ``params.json``, else a legacy ``params.pkl`` read as
    plain data only. Raises :class:`ModelFileError` for a missing, corrupt, foreign or newer file."""
    folder = Path(folder)
    path = folder / PARAMS_NAME
    if not path.is_file():
        legacy = folder / LEGACY_PARAMS_NAME
        if legacy.is_file():
            params = _read_legacy_params(legacy)
            path = legacy
        else:
            raise ModelFileError(
                f"No {PARAMS_NAME} in {_show(folder)}. Fix: point at a model folder written by `defectscope train` "
                "(results/<project>/<group>/<run>/models/<n>)."
            )
    else:
        try:
            params = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelFileError(
                f"{_show(path)} is not valid JSON ({err}); the file is truncated or corrupt. Fix: copy the "
                "model folder again from its source, or retrain the model."
            ) from err
        if not isinstance(params, dict) or params.get("format") != FORMAT_NAME:
            raise ModelFileError(
                f"{_show(path)} is JSON but not a defectscope model file (no \"format\": \"{FORMAT_NAME}\"). "
                "Fix: point at a model folder written by `defectscope train`."
            )
    version = params.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ModelFileError(
            f"{_show(path)} has model-file format version {version!r}; this defectscope reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. Fix: open it with the defectscope version that wrote it, "
            "or upgrade defectscope (`pip install -U defectscope`)."
        )
    for key, kind in (("model", str), ("hparams", dict)):
        if not isinstance(params.get(key), kind):
            raise ModelFileError(
                f"{_show(path)} lacks the {key!r} entry ({kind.__name__}); the file is incomplete. Fix: retrain the model."
            )
    return params


def load_tensors(path: str | Path, what: str = "model weights") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with a clear :class:`ModelFileError` for a
    missing, empty, truncated, random or code-carrying file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{what.capitalize()} file {_show(path)} not found. Fix: check the path, or retrain.")
    if path.stat().st_size == 0:
        raise ModelFileError(
            f"{what.capitalize()} file {_show(path)} is empty (0 bytes): a copy or a write was cut short. "
            "Fix: copy the model folder again from its source, or retrain."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        unsafe = "weights only" in str(err).lower() or "unsupported global" in str(err).lower()
        if unsafe:
            raise ModelFileError(
                f"Refused {_show(path)}: it holds Python objects other than tensors and plain data "
                f"({first}), and loading them could run code. Fix: use a model file from a source you "
                "trust, or retrain the model."
            ) from err
        raise ModelFileError(
            f"{what.capitalize()} file {_show(path)} is corrupt ({first}). Fix: copy the model folder again, or retrain."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError, TypeError,
            AttributeError, MemoryError, UnicodeDecodeError) as err:
        raise _corrupt(path, what, err) from err
    if not isinstance(obj, dict):
        raise ModelFileError(f"{_show(path)} holds a {type(obj).__name__}, not {what}. Fix: retrain the model.")
    return obj


def save_tensors(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` atomically (see :func:`atomic_write`)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda fh: fh.write(buffer.getbuffer()))


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
