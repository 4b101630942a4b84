"""deepkiln's model in DeepSeek's published checkpoint layout, both ways.

    write_hf_weights(model, out)          # model.safetensors, or shards + model.safetensors.index.json
    model = load_hf_model(folder)         # a DeepSeek-V2/V3 folder (downloaded or exported) -> Transformer

(config.json both ways is deepkiln.hf_config, which needs no torch.)

The layout is the one DeepSeek publishes and transformers (`DeepseekV3ForCausalLM` for sigmoid routers,
`DeepseekV2ForCausalLM` for softmax ones) and vLLM load: renamed tensors, routed experts one per
expert, the MTP module as layer `n_layers` (with its own copies of the embedding and head, as DeepSeek
ships them) and its input projection's two column halves swapped (they concatenate
[embedding; hidden], deepkiln [hidden; embedding]). Weights are read one tensor at a time into a model
allocated once, never the whole model in memory twice. Plain torch and safetensors: no transformers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deepkiln.hf_config import read_hf_args
from deepkiln.model import Gate, ModelArgs, Transformer

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
SHARD_BYTES = 4 << 30  # per safetensors file, as published checkpoints split theirs

_ATTN = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
         "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_MTP = {"hidden_norm": "hnorm", "embed_norm": "enorm", "proj": "eh_proj", "norm": "shared_head.norm"}


def _block(name: str) -> str:
    """A Block's tensor name -> its name inside a published decoder layer."""
    part, _, rest = name.partition(".")
    if part in ("attn_norm", "ffn_norm"):
        return {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}[part] + "." + rest
    if part == "attn":
        layer, _, leaf = rest.partition(".")
        return f"self_attn.{_ATTN[layer]}.{leaf}"
    p = rest.split(".")
    if p[0] in _MLP:                                        # a dense layer's MLP
        return f"mlp.{_MLP[p[0]]}.{p[1]}"
    if p[0] == "gate":
        return "mlp.gate.weight" if p[1] == "proj" else "mlp.gate.e_score_correction_bias"
    if p[0] == "experts":
        return f"mlp.experts.{p[1]}.{_MLP[p[2]]}.{p[3]}"
    if p[0] == "shared":
        return f"mlp.shared_experts.{_MLP[p[1]]}.{p[2]}"
    raise KeyError(name)


def hf_name(name: str, args: ModelArgs) -> str:
    """deepkiln's name of a persistent tensor -> its name in the published layout."""
    top = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "head.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    scope, index, rest = name.split(".", 2)
    if scope == "layers":
        return f"model.layers.{index}.{_block(rest)}"
    layer = args.n_layers + int(index)                      # mtp.<i>: the layers after the main model's
    part, _, leaf = rest.partition(".")
    return f"model.layers.{layer}." + (f"{_MTP[part]}.{leaf}" if part in _MTP else _block(leaf))


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    """The MTP projection's [hidden; embedding] columns <-> [embedding; hidden] (its own inverse)."""
    return torch.cat(w.chunk(2, dim=1)[::-1], dim=1)


def _is_mtp_proj(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "mtp" and parts[2] == "proj"


def _names(model: Transformer) -> dict[str, str]:
    """deepkiln name -> published name of every persistent tensor the published layout has (softmax
    routers have no bias there)."""
    args = model.args
    return {name: hf_name(name, args) for name in model.state_dict()
            if not (name.endswith("gate.bias") and args.score_func == "softmax")}


def _exported(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(published name, tensor as published) for every tensor of a published folder."""
    args, state = model.args, model.state_dict()
    for name in (n for n in state if n.endswith("gate.bias") and args.score_func == "softmax"):
        if not state[name].is_meta and state[name].any():
            raise ValueError(f"{name} is not zero: DeepSeek-V2's format has no balancing bias for softmax "
                             "routers (deepkiln keeps theirs at zero; this checkpoint predates that)")
    for name, hf in _names(model).items():
        yield hf, _swap_halves(state[name]) if _is_mtp_proj(name) else state[name]
    for i in range(args.n_mtp_layers):  # DeepSeek ships the MTP layer's own copies (safetensors refuses views)
        yield f"model.layers.{args.n_layers + i}.embed_tokens.weight", _copy(state["embed.weight"])
        yield f"model.layers.{args.n_layers + i}.shared_head.head.weight", _copy(state["head.weight"])


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_meta else t.clone()


def hf_shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    """Published name -> shape of every tensor the folder would hold (works on the meta device)."""
    return {hf: tuple(t.shape) for hf, t in _exported(model)}


def write_hf_weights(model: Transformer, out: str | Path, dtype: torch.dtype | None = None,
                     shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Write the model's weights in the published layout into folder `out`: one model.safetensors,
    or numbered shards and model.safetensors.index.json beyond `shard_bytes`. Router weights and
    biases stay fp32 (as transformers keeps them); `dtype` casts the rest. Returns the files."""
    out = Path(out)

    def cast(name: str, t: torch.Tensor) -> torch.Tensor:
        keep = ".gate." in name or dtype is None
        return (t if keep else t.to(dtype)).detach().to("cpu").contiguous()

    items = list(_exported(model))
    sizes = [t.numel() * (t.element_size() if dtype is None or ".gate." in hf else dtype.itemsize)
             for hf, t in items]
    shards, current, filled = [], [], 0
    for item, size in zip(items, sizes):
        if current and filled + size > shard_bytes:
            shards.append(current)
            current, filled = [], 0
        current.append(item)
        filled += size
    shards.append(current)
    names = [WEIGHTS] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                for i in range(len(shards))]
    for file, shard in zip(names, shards):
        save_file({hf: cast(hf, t) for hf, t in shard}, out / file, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)},
                 "weight_map": {hf: file for file, shard in zip(names, shards) for hf, _ in shard}}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        names.append(INDEX)
    return names


def _weight_files(folder: Path) -> list[Path]:
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text())
        return [folder / f for f in sorted(set(index["weight_map"].values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} holds no *.safetensors weights (nor {INDEX})")
    return files


def load_hf_model(folder: str | Path, dtype: torch.dtype | None = None,
                  args: ModelArgs | None = None) -> Transformer:
    """The Transformer of a published-layout folder, its weights read one tensor at a time into a
    model allocated once (in `dtype`, default float32; routers' biases stay fp32). `args` defaults to
    the folder's config.json; fields that are not the shape (moe_impl, ...) may differ. Refuses
    missing, unexpected or misshapen tensors by name."""
    folder = Path(folder)
    args = args or read_hf_args(folder)
    with torch.device("meta"):
        model = Transformer(args)
    if dtype is not None:
        model.to(dtype)
    model.to_empty(device="cpu")
    targets = {hf: name for name, hf in _names(model).items()}
    state = model.state_dict(keep_vars=True)
    filled, unexpected = set(), []
    with torch.no_grad():
        for file in _weight_files(folder):
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if key not in targets:
                        mtp_copy = key.startswith(f"model.layers.{args.n_layers}.") and key.endswith(
                            ("embed_tokens.weight", "shared_head.head.weight"))  # deepkiln shares them
                        if not mtp_copy and not _beyond_mtp(key, args):
                            unexpected.append(key)
                        continue
                    name, t = targets[key], f.get_tensor(key)
                    target = state[name]
                    if _is_mtp_proj(name):
                        t = _swap_halves(t)
                    if tuple(t.shape) != tuple(target.shape):
                        raise ValueError(f"{file.name}: {key} has shape {tuple(t.shape)}, the config implies "
                                         f"{tuple(target.shape)}")
                    target.copy_(t)
                    filled.add(key)
    if unexpected:
        hint = " (FP8 weights: convert them to bf16 first)" if any("scale_inv" in k for k in unexpected) else ""
        raise ValueError(f"{folder}: {len(unexpected)} tensors deepkiln's model has no place for{hint}, e.g. "
                         + ", ".join(sorted(unexpected)[:5]))
    missing = sorted(set(targets) - filled)
    if missing:
        raise ValueError(f"{folder}: {len(missing)} tensors missing, e.g. " + ", ".join(missing[:5]))
    for gate in (m for m in model.modules() if isinstance(m, Gate)):
        gate.counts.zero_()
        if args.score_func == "softmax":
            gate.bias.zero_()
    return model


def _beyond_mtp(key: str, args: ModelArgs) -> bool:
    """A tensor of a second or later MTP layer (V3 ships one; deepkiln trains at most one)."""
    parts = key.split(".")
    return len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() and int(parts[2]) > args.n_layers


def load_start(cfg, path: str | Path, dtype: torch.dtype | None = None) -> tuple[Transformer, dict]:
    """The model a stage starts from: the checkpoint at `path` (the run's trained or final model), or,
    while the run has none yet, the published weights model.init names. Returns it with {source, step,
    tokens, sha256}: sha256 names the weights (a checkpoint's manifest entry; for a published folder,
    its config.json and weight files' names and sizes), so a resumed stage can tell its base changed."""
    import hashlib

    from deepkiln.checkpoint import MANIFEST, load_model

    if cfg.model.init and not (Path(path) / MANIFEST).is_file():
        folder = Path(cfg.model.init)
        h = hashlib.sha256((folder / "config.json").read_bytes())
        for f in _weight_files(folder):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
        model = load_hf_model(folder, dtype, args=cfg.model)
        return model, {"source": str(folder), "step": 0, "tokens": 0, "sha256": h.hexdigest()}
    model, ckpt = load_model(path, cfg.model, dtype)
    return model, {"source": str(path), "step": ckpt.manifest.get("step"), "tokens": ckpt.manifest.get("tokens"),
                   "sha256": ckpt.manifest["files"]["model.safetensors"]["sha256"]}
