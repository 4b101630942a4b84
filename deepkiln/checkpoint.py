"""Model checkpoints: safetensors weights + config.json + manifest.json, written atomically.

A checkpoint is a folder. It is written under a temporary name and renamed into place, with the
manifest (sizes and sha256 of every file) written last, so a crash never leaves a folder that
`load_checkpoint` would accept. Weights are never pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deepkiln.corpus import replace_folder
from deepkiln.model import RUNTIME_FIELDS, ModelArgs, Transformer

WEIGHTS, CONFIG, MANIFEST = "model.safetensors", "config.json", "manifest.json"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    config: dict      # the resolved config that made it; config["model"] holds the ModelArgs
    manifest: dict    # step, tokens, created, files {name: {bytes, sha256}}

    @property
    def model_args(self) -> ModelArgs:
        return ModelArgs.model_validate(self.config["model"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(path: str | Path, model: torch.nn.Module, config: dict, *,
                    step: int = 0, tokens: int = 0, files: dict[str, str | Path] | None = None) -> Path:
    """Write model weights and `config` (the resolved config dict, with a "model" section) to folder
    `path`, replacing any checkpoint already there only once the new one is complete. `files`: more
    files to carry inside it, {name: source path} (the tokenizer, in served artifacts), listed in the
    manifest like the weights."""
    path = Path(path)
    if "model" not in config:
        raise ValueError("config must hold a 'model' section (ModelArgs) to be saved with the weights")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp / WEIGHTS, metadata={"format": "pt"})
    with open(tmp / WEIGHTS, "rb+") as f:
        os.fsync(f.fileno())
    _write_synced(tmp / CONFIG, json.dumps(config, indent=2) + "\n")
    for name, source in (files or {}).items():
        shutil.copyfile(source, tmp / name)
        with open(tmp / name, "rb+") as f:
            os.fsync(f.fileno())
    listed = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
              for name in (WEIGHTS, CONFIG, *(files or {}))}
    manifest = {"format_version": FORMAT_VERSION, "step": step, "tokens": tokens,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": listed}
    _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    replace_folder(tmp, path)
    return path


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Copy the checkpoint folder `src` to `dst` atomically: a reader of `dst` sees the old folder or
    the complete new one, never a mix (the copy goes to a temporary sibling, then is renamed)."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    replace_folder(tmp, dst)
    return dst


def check_model_args(saved: ModelArgs, expected: ModelArgs, where: str | Path) -> None:
    """Refuse a checkpoint whose model shape differs from the one asked for, naming every field."""
    a, b = saved.model_dump(exclude=RUNTIME_FIELDS), expected.model_dump(exclude=RUNTIME_FIELDS)
    diff = [f"model.{k}: checkpoint has {a[k]!r}, expected {b[k]!r}" for k in a if a[k] != b[k]]
    if diff:
        raise ValueError(f"checkpoint {where} does not match the model config: " + "; ".join(diff))


def load_checkpoint(path: str | Path, expected: ModelArgs | None = None) -> Checkpoint:
    """Read and verify a checkpoint folder. Raises ValueError naming the file that is missing,
    truncated or corrupt, or the model fields that differ from `expected`."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} does not exist")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{manifest_path} is missing: the checkpoint is incomplete")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{manifest_path} is unreadable: {e}") from None
    for name in (WEIGHTS, CONFIG, *sorted(set(files) - {WEIGHTS, CONFIG})):
        file = path / name
        if name not in files or not file.is_file():
            raise ValueError(f"{file} is missing from the checkpoint")
        size = file.stat().st_size
        if size != files[name]["bytes"]:
            raise ValueError(f"{file} has {size} bytes, the manifest says {files[name]['bytes']}: truncated or replaced")
        if _sha256(file) != files[name]["sha256"]:
            raise ValueError(f"{file} does not match its sha256 in the manifest: corrupt")
    config = json.loads((path / CONFIG).read_text())
    ckpt = Checkpoint(state_dict={}, config=config, manifest=manifest)
    if expected is not None:
        check_model_args(ckpt.model_args, expected, path)
    try:
        ckpt.state_dict = load_file(path / WEIGHTS)
    except SafetensorError as e:
        raise ValueError(f"{path / WEIGHTS} is not a readable safetensors file: {e}") from None
    return ckpt


def load_model(path: str | Path, expected: ModelArgs | None = None,
               dtype: torch.dtype | None = None) -> tuple[Transformer, Checkpoint]:
    """Build the Transformer a checkpoint describes and load its weights (strictly)."""
    ckpt = load_checkpoint(path, expected)
    model = Transformer(expected or ckpt.model_args)
    model.load_state_dict(ckpt.state_dict, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model, ckpt
