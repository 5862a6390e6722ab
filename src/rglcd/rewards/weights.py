"""Where reward weights come from: a local file or folder, or a file of a Hugging Face hub repo; and the folder
format of the models the package trains itself."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


def resolve_file(reference: str | Path, filename: str | None = None) -> Path:
    """A local file; a local folder holding ``filename``; ``"owner/repo/path/in/repo"``; or, with ``filename``, a
    hub repo id ``"owner/repo"`` whose ``filename`` is meant. Hub files are downloaded once, then read from the
    cache; offline and uncached, the error says what to download and pass instead."""
    path = Path(reference).expanduser()
    if path.is_dir() and filename is not None:
        path = path / filename
    if path.is_file():
        return path
    parts = str(reference).split("/")
    if path.is_absolute() or str(reference).startswith((".", "~")) or path.is_dir():
        raise FileNotFoundError(f"no file {path}" + (f" (looked for {filename})" if filename else ""))
    if len(parts) >= 3:
        repo, in_repo = "/".join(parts[:2]), "/".join(parts[2:])
    elif filename is not None:
        repo, in_repo = str(reference), filename
    else:
        raise FileNotFoundError(f"{reference!r} is neither a local file nor a hub file (owner/repo/filename)")
    try:
        return Path(hf_hub_download(repo, in_repo))
    except (OSError, ValueError) as error:  # offline and not cached, unknown repo or file, invalid repo id
        raise FileNotFoundError(
            f"{str(reference)!r} is neither a local file nor available from the hub ({type(error).__name__}: "
            f"{error}); download {in_repo} from https://huggingface.co/{repo} and pass its local path"
        ) from error


def load_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` or torch file, bare or under ``"state_dict"`` (as HPSv2 and open_clip's
    trainer save it), without the ``module.`` prefix that DistributedDataParallel adds."""
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_strict(module: nn.Module, state: dict[str, Tensor], source: str | Path) -> None:
    """``load_state_dict(strict=True)``, with an error that says which file does not fit."""
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{source} does not fit the {type(module).__name__} it is loaded into: {error}") from error


# A trained model folder of our own (the world's rewards, the latent proxy RM): its weights, and a JSON record of
# what kind of model it is, its architecture config and how it was trained.
MODEL_WEIGHTS_FILE = "model.safetensors"
MODEL_RECORD_FILE = "config.json"


def save_model_folder(model: nn.Module, out: str | Path, kind: str, config: dict, training: dict | None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, out / MODEL_WEIGHTS_FILE)
    record = {"kind": kind, "config": config, "training": training or {}}
    (out / MODEL_RECORD_FILE).write_text(json.dumps(record, indent=2))
    return out


def read_model_config(folder: Path, kind: str, make_it: str) -> dict:
    """The architecture config of a ``kind`` folder; ``make_it`` (e.g. "run `rglcd lrm pretrain`") ends the errors."""
    for file in (MODEL_RECORD_FILE, MODEL_WEIGHTS_FILE):
        if not (folder / file).is_file():
            raise FileNotFoundError(f"{folder} has no {file}: it is not a {kind} folder; {make_it}")
    record = json.loads((folder / MODEL_RECORD_FILE).read_text())
    if record.get("kind") != kind:
        raise ValueError(f"{folder} holds {record.get('kind')!r} weights, not {kind!r}; point to a {kind} folder")
    return record["config"]


def read_training_record(folder: str | Path) -> dict:
    """The training record saved with a model folder's config (settings, seconds, held-out figures)."""
    return json.loads((Path(folder) / MODEL_RECORD_FILE).read_text())["training"]


def load_model_weights(model: nn.Module, folder: Path, make_it: str) -> None:
    try:
        model.load_state_dict(load_file(folder / MODEL_WEIGHTS_FILE))
    except RuntimeError as error:
        raise ValueError(
            f"{folder / MODEL_WEIGHTS_FILE} does not match its {MODEL_RECORD_FILE} ({error}); {make_it}"
        ) from error
