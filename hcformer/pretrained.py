"""Where the pretrained backbone weights live, and ``hcformer fetch-weights`` to put them there.

A backbone's ``model.backbone.pretrained: "timm:<name>"`` is resolved in this order:

1. ``<weights folder>/<name>.safetensors`` (or ``.pth``, ``.bin``): the weights folder is
   ``$HCFORMER_WEIGHTS`` when set, else ``weights/`` under the current directory; compute
   nodes without network read the weights from there;
2. huggingface_hub's cache (timm's own download path: ``$HF_HUB_CACHE``, else
   ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), downloading into it when online.

``hcformer fetch-weights --dir weights`` downloads, on a machine with network, every checkpoint
the experiments of a scale name into that folder (``model.safetensors`` of timm's hub
repository ``timm/<name>``, renamed ``<name>.safetensors``). It imports no torch; the check of
``hcformer check-data`` uses :func:`weights_present`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import huggingface_hub

from hcformer.errors import HCFormerError

WEIGHTS_ENV = "HCFORMER_WEIGHTS"
SUFFIXES = (".safetensors", ".pth", ".bin")
TIMM_PREFIX = "timm:"


def weights_dir() -> Path:
    """The weights folder: ``$HCFORMER_WEIGHTS``, else ``weights/`` (relative to the cwd)."""
    return Path(os.environ.get(WEIGHTS_ENV) or "weights")


def local_weights(name: str, folder: Path | None = None) -> Path | None:
    """The checkpoint of timm model ``name`` in the weights folder, or ``None``."""
    folder = weights_dir() if folder is None else Path(folder)
    for suffix in SUFFIXES:
        path = folder / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def hub_cache() -> Path:
    """Where huggingface_hub (timm's download path) keeps its files."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "huggingface"
    )
    return Path(home) / "hub"


def weights_present(spec: str) -> tuple[bool, Path]:
    """Whether a ``pretrained`` value loads without network, and the file or folder it needs.

    ``timm:<name>``: the weights folder's file or the hub cache's ``models--timm--<name>``;
    otherwise ``spec`` is a checkpoint file.
    """
    if not spec.startswith(TIMM_PREFIX):
        return Path(spec).is_file(), Path(spec)
    name = spec[len(TIMM_PREFIX) :]
    local = local_weights(name)
    if local is not None:
        return True, local
    cached = hub_cache() / f"models--timm--{name.replace('/', '--')}"
    if cached.is_dir():
        return True, cached
    return False, weights_dir() / f"{name}.safetensors"


def download(name: str, folder: Path) -> Path:
    """Download timm model ``name``'s pretrained checkpoint to ``folder/<name>.safetensors``.

    The file is timm's hub repository's own (``timm/<name>``, ``model.safetensors``), written
    under a temporary name and renamed, so an interrupted download leaves no checkpoint.
    """
    import timm  # here, not at the top: it imports torch (3 s); this module imports no torch

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - timm raises several kinds for an unknown tag
        cfg = None
    if cfg is None or not cfg.hf_hub_id:
        raise HCFormerError(f"timm:{name}: timm knows no pretrained weights of this name")
    filename = cfg.hf_hub_filename or "model.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / f"{name}{Path(filename).suffix}"
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        got = huggingface_hub.hf_hub_download(
            repo_id=cfg.hf_hub_id, filename=filename, local_dir=tmp
        )
        os.replace(got, dst)
    return dst


def timm_weights(specs: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """The ``timm:<name>`` values among ``model.backbone.pretrained`` values (-> their users),
    by name."""
    return {s[len(TIMM_PREFIX) :]: users for s, users in specs.items() if s.startswith(TIMM_PREFIX)}


def fetch_weights(
    folder: Path,
    specs: Mapping[str, list[str]],
    *,
    scale: str,
    log: Callable[[str], None] = print,
) -> int:
    """Download into ``folder`` every ``timm:`` checkpoint of ``specs`` (the
    ``model.backbone.pretrained`` values of a scale's experiments -> the experiment ids:
    :func:`hcformer.experiments.pretrained_weights`) that it lacks, saying what each one is
    (``log``); returns how many were downloaded."""
    names = timm_weights(specs)
    if not names:
        log(f"fetch-weights: the {scale} scale names no pretrained timm weights")
        return 0
    fetched = 0
    for name, users in sorted(names.items()):
        have = local_weights(name, folder)
        if have is not None:
            log(f"fetch-weights: {have}: present ({len(users)} experiments)")
            continue
        path = download(name, folder)
        fetched += 1
        size = path.stat().st_size / 2**20
        log(f"fetch-weights: {path}: downloaded, {size:.0f} MiB ({len(users)} experiments)")
    if not fetched:
        log(f"fetch-weights: {folder}: every checkpoint is present, nothing to do")
    if folder.resolve() != weights_dir().resolve():
        log(f"fetch-weights: runs find them with: export {WEIGHTS_ENV}={folder.resolve()}")
    return fetched
