"""Where every artifact of a run lives: the one place that knows the layout of <run_dir>/<run.name>/.

    paths = RunPaths.of(cfg)
    paths.train_model, paths.final_model, paths.artifact, paths.collector_db(0)

Config fields that name a path win over the layout: train.tokens, quant.source, fairness.model,
serve.artifact, serve.tokenizer, feedback.store. `absolute(cfg)` is the config with every local path
made absolute, for processes that run in folders of their own (Ray workers, Tune trials, jobs,
Serve replicas); URIs (s3://, gs://) stay as they are.

    <root>/prepare/{shards/, prepare_report.json}
    <root>/tokenizer/{tokenizer.model, tokens/index.json}
    <root>/train/{model/, train_summary.json, progress.jsonl, tensorboard/, loss.png, ray/}
    <root>/tune/  <root>/dp_finetune/{model/, report.json, state/}  <root>/audit/report.json
    <root>/quantize/{bf16,int8,nf4}/, report.json   <root>/feedback/collector-<i>.sqlite
    <root>/online/{state.json, replay.sqlite, versions/vNNNN/, updates/update-NNNN.json, rewards/rNNNN/, ray/}
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deepkiln.config import Config

# The file each stage writes last: its presence means the stage finished (the quickstart reuses it).
DONE = {"prepare": "prepare/prepare_report.json", "tokenizer": "tokenizer/tokens/index.json",
        "train": "train/train_summary.json", "dp_finetune": "dp_finetune/report.json",
        "audit": "audit/report.json", "quantize": "quantize/report.json", "online": "online/state.json"}


def is_uri(path: str) -> bool:
    return "://" in path


def _absolute(path: str) -> str:
    return path if not path or is_uri(path) else os.path.abspath(path)


@dataclass(frozen=True)
class RunPaths:
    root: str                 # <run_dir>/<run.name>
    tokens: str               # packed token shards: train.tokens, else <root>/tokenizer/tokens
    tokenizer_model: str      # serve.tokenizer, else <root>/tokenizer/tokenizer.model (tokenizer.json when
                              # model.init brings a tokenizers one)
    audit_model: str          # fairness.model, else final_model
    artifact: str             # what Serve loads: serve.artifact, else <root>/quantize/<quant.format>
    feedback: str             # feedback.store, else <root>/feedback
    final_model: str          # what later stages start from: quant.source, else the DP model when
                              # privacy is on, else the training export

    @classmethod
    def of(cls, cfg: Config) -> RunPaths:
        root = f"{cfg.run.run_dir.rstrip('/')}/{cfg.run.name}"
        final = cfg.quant.source or (f"{root}/dp_finetune/model" if cfg.privacy.enabled else f"{root}/train/model")
        return cls(root=root, tokens=cfg.train.tokens or f"{root}/tokenizer/tokens",
                   tokenizer_model=cfg.serve.tokenizer or f"{root}/tokenizer/{_tokenizer_file(cfg)}",
                   audit_model=cfg.fairness.model or final,
                   artifact=cfg.serve.artifact or f"{root}/quantize/{cfg.quant.format}",
                   feedback=cfg.feedback.store or f"{root}/feedback", final_model=final)

    def stage(self, name: str) -> str:
        """<root>/<name>: the folder a stage writes."""
        return f"{self.root}/{name}"

    def remove(self, path: str | Path) -> None:
        """Delete the folder `path`, which must lie inside this run's folder (after following
        symlinks): the one way stages delete, so nothing outside <run_dir>/<run.name> is ever deleted.
        Absent: nothing to do."""
        import shutil

        target, root = Path(path).resolve(), Path(self.root).resolve()
        if root not in target.parents:
            raise ValueError(f"refusing to delete {target}: it is not inside the run folder {root}")
        shutil.rmtree(target, ignore_errors=True)

    def done(self, stage: str) -> Path | None:
        """The file `stage` writes last; None for stages that always run (serve)."""
        return Path(self.root, DONE[stage]) if stage in DONE else None

    # prepare and tokenizer
    @property
    def shards(self) -> str:
        return f"{self.root}/prepare/shards"

    # train
    @property
    def train_model(self) -> str:
        return f"{self.root}/train/model"

    @property
    def train_ray(self) -> str:
        return f"{self.root}/train/ray"

    # dp_finetune
    @property
    def dp_model(self) -> str:
        return f"{self.root}/dp_finetune/model"

    # quantize
    def quantized(self, fmt: str) -> str:
        return f"{self.root}/quantize/{fmt}"

    # feedback and online
    def collector_db(self, index: int) -> str:
        return f"{self.feedback}/collector-{index}.sqlite"

    @property
    def replay_db(self) -> str:
        return f"{self.root}/online/replay.sqlite"

    @property
    def online_state(self) -> str:
        return f"{self.root}/online/state.json"

    def version(self, name: str) -> str:
        return f"{self.root}/online/versions/{name}"

    def update_report(self, update: int) -> str:
        return f"{self.root}/online/updates/update-{update:04d}.json"

    def reward(self, name: str) -> str:
        """A reward model version (pipelines.reward): rNNNN."""
        return f"{self.root}/online/rewards/{name}"


def _tokenizer_file(cfg: Config) -> str:
    """tokenizer.model (SentencePiece: trained here, or an imported one), or tokenizer.json when
    model.init's folder brings only a `tokenizers` one."""
    from deepkiln.tokenizer import tokenizer_in

    found = tokenizer_in(cfg.model.init) if cfg.model.init and not is_uri(cfg.model.init) else None
    return found.name if found else "tokenizer.model"


def tokenizer_files(tokenizer: str | Path) -> dict[str, str]:
    """{name: path} of the files a tokenizer is (an artifact carries them all): tokenizer.model, or
    tokenizer.json with the tokenizer_config.json beside it."""
    tokenizer = Path(tokenizer)
    files = {tokenizer.name: str(tokenizer)}
    config = tokenizer.with_name("tokenizer_config.json")
    if tokenizer.suffix == ".json" and config.is_file():
        files[config.name] = str(config)
    return files


def tokenizer_of(cfg: Config, artifact: str | Path) -> str:
    """The tokenizer that goes with `artifact`: serve.tokenizer when set, else the copy inside the
    artifact (so re-running the tokenizer stage never changes what a served model's ids mean), else
    the run's (an artifact from before artifacts carried one)."""
    from deepkiln.tokenizer import tokenizer_in

    if cfg.serve.tokenizer:
        return cfg.serve.tokenizer
    inside = tokenizer_in(artifact)
    return str(inside) if inside else RunPaths.of(cfg).tokenizer_model


def version_of(artifact: str | Path) -> str:
    """A model version's name: the artifact folder, its training step and a prefix of its weights' hash."""
    import json

    manifest = json.loads((Path(artifact) / "manifest.json").read_text())
    return f"{Path(artifact).name}-step{manifest.get('step', 0)}-{manifest['files']['model.safetensors']['sha256'][:8]}"


def absolute(cfg: Config) -> Config:
    """A copy of `cfg` whose run_dir and path fields are absolute (local ones; URIs unchanged)."""
    cfg = cfg.model_copy(deep=True)
    cfg.run.run_dir = _absolute(cfg.run.run_dir)
    for section, key in (("model", "init"), ("train", "tokens"), ("quant", "source"), ("fairness", "model"),
                         ("serve", "artifact"),
                         ("serve", "tokenizer"), ("feedback", "store")):
        setattr(getattr(cfg, section), key, _absolute(getattr(getattr(cfg, section), key)))
    return cfg
