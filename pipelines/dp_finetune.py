"""DP fine-tune: differentially private fine-tuning of the trained model with Opacus (DP-SGD), on
plain PyTorch in one process (Opacus does not run on the DeepSpeed engine), and the utility it costs.

    python -m pipelines.dp_finetune --config configs/tiny.yaml [--privacy.data=private.jsonl --privacy.target_epsilon=3]
    ray job submit --working-dir . -- python -m pipelines.dp_finetune --config configs/tiny.yaml --run.run_dir=$PWD/runs

(A job runs in a copy of the working folder: give it an absolute run_dir, local or on a shared
file system, where the earlier stages wrote; privacy.data may also be an s3:// or gs:// URI.)

Reads the train stage's export <run_dir>/<run.name>/train/model (before there is one, the published
weights model.init names), the tokenizer, and the private
set: privacy.data (jsonl/Parquet, one record per row, or one user per example with
privacy.user_field), or by default the tokenizer stage's token windows. train.val_fraction of the
examples is held out. LoRA adapters (or the full weights outside the MoE and MTP layers) train with
Poisson sampling, per-sample clipping and Gaussian noise calibrated to privacy.target_epsilon.

Writes <run_dir>/<run.name>/dp_finetune/: state/ (trainable weights, optimizer, accountant history:
a later run continues it, so epsilon never resets; delete the folder only to start over with new
data), model/ (the merged checkpoint: --fairness.model / --quant.source take it) and report.json
(epsilon, delta, noise, clipping, sample rate, steps, privacy unit, and validation loss of the base
model, the DP fine-tune and the same fine-tune without DP). A run that would exceed the budget stops
before the step that would, with a message saying so. Only the weights carry the guarantee: the
reported losses are plain averages over held-out private examples, and the non-DP model is not saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset

from deepkiln.checkpoint import save_checkpoint
from deepkiln.config import Config, load_config
from deepkiln.corpus import read_records
from deepkiln.evaluate import pad_rows, windows
from deepkiln.hf import load_start
from deepkiln.lora import merge_lora
from deepkiln.paths import RunPaths
from deepkiln.precision import compute_dtype, describe
from deepkiln.privacy import apply_dp, dp_backward, dp_trainable, lm_loss
from deepkiln.tokenizer import load_tokenizer

STATE = "state"


def _pack(rows: list[list[int]], seq_len: int) -> TensorDataset:
    """Inputs and targets, each row cut to seq_len + 1 tokens, every token a target, right-padded."""
    return TensorDataset(*pad_rows([(r[:seq_len + 1], r[:seq_len + 1]) for r in rows]))


def private_set(cfg: Config) -> tuple[TensorDataset, TensorDataset, str]:
    """(training examples, held-out examples, privacy unit). Records are [BOS] text [EOS], as the
    server prompts the model; a user's records are concatenated into one example."""
    p, t, rng = cfg.privacy, cfg.train, np.random.default_rng(cfg.run.seed)
    if not p.data:
        if p.user_field:
            raise ValueError(f"privacy.user_field={p.user_field!r} needs privacy.data: token windows have no users")
        data = windows(cfg)
        train_ids = np.arange(data.n_train)
        if p.max_examples and data.n_train > p.max_examples:
            print(f"dp_finetune: {p.max_examples} of {data.n_train} windows drawn (privacy.max_examples)", flush=True)
            train_ids = np.sort(rng.choice(data.n_train, p.max_examples, replace=False))
        val_ids = np.arange(data.n_train, data.n_train + min(data.n_val, t.eval_batches * p.batch_size))
        train, val = (TensorDataset(*data.batch(ids.tolist())) for ids in (train_ids, val_ids))
        return train, val, f"one window of train.seq_len + 1 = {t.seq_len + 1} tokens of the token shards"
    required = {cfg.data.text_field: "data.text_field"} | ({p.user_field: "privacy.user_field"} if p.user_field else {})
    records = read_records(p.data, "privacy.data", required)
    texts, users = records[cfg.data.text_field], records.get(p.user_field) if p.user_field else None
    for i, text in enumerate(texts):
        if not isinstance(text, str) or (users is not None and users[i] is None):
            field = cfg.data.text_field if not isinstance(text, str) else p.user_field
            raise ValueError(f"privacy.data={p.data!r}: row {i + 1} has no {field!r} value")
    tokenizer = load_tokenizer(RunPaths.of(cfg).tokenizer_model)
    docs = [[*tokenizer.encode_prompt(""), *ids, tokenizer.eos_id] for ids in tokenizer.encode_batch(texts)]
    if users is None:
        rows, unit = docs, f"one record of {p.data} (cut to {t.seq_len + 1} tokens)"
    else:
        by_user: dict = {}
        for user, doc in zip(users, docs):
            by_user.setdefault(user, []).extend(doc)
        rows, unit = list(by_user.values()), f"one user (privacy.user_field={p.user_field!r}): all their records, cut to {t.seq_len + 1} tokens"
        cut = sum(len(r) > t.seq_len + 1 for r in rows)
        if cut:
            print(f"dp_finetune: {cut} of {len(rows)} users' records exceed {t.seq_len + 1} tokens and are cut", flush=True)
    order = rng.permutation(len(rows))
    n_val = max(1, int(len(rows) * t.val_fraction))
    if len(rows) - n_val < 1:
        raise ValueError(f"privacy.data={p.data!r} holds {len(rows)} examples: too few to hold out "
                         f"train.val_fraction={t.val_fraction} and train on the rest")
    train_idx = order[n_val:]
    if p.max_examples and len(train_idx) > p.max_examples:
        print(f"dp_finetune: {p.max_examples} of {len(train_idx)} examples drawn (privacy.max_examples)", flush=True)
        train_idx = train_idx[:p.max_examples]
    return _pack([rows[i] for i in train_idx], t.seq_len), _pack([rows[i] for i in order[:n_val]], t.seq_len), unit


def fingerprint(data: TensorDataset) -> str:
    h = hashlib.sha256()
    for tensor in data.tensors:
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def build(cfg: Config) -> tuple[torch.nn.Module, dict]:
    """The base model with the trainable part chosen (LoRA adapters seeded by run.seed)."""
    model, origin = load_start(cfg, RunPaths.of(cfg).train_model, compute_dtype(cfg.train.dtype))
    torch.manual_seed(cfg.run.seed)
    dp_trainable(model, cfg.privacy.params, cfg.lora)
    return model.train(), origin


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_state(path: Path, model, optimizer, meta: dict) -> None:
    """Trainable weights, optimizer state and meta (step, accountant) in a folder renamed into place
    complete, so a crash leaves the previous state or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_state(path: Path, model, meta_expected: dict) -> tuple[dict, dict] | None:
    """(meta, optimizer state) of a saved state after loading its weights into `model`; None if none.
    A state made from another base model, private set or trainable part cannot be continued."""
    if not (path / "state.json").is_file():
        return None
    meta = json.loads((path / "state.json").read_text())
    for key, value in meta_expected.items():
        if meta[key] != value:
            raise ValueError(f"{path} was made with {key}={meta[key]!r}, this run has {value!r}: its privacy "
                             f"accountant cannot continue here. Keep the old inputs, or delete {path} "
                             "(the budget it spent still counts for the data it saw)")
    missing, _ = model.load_state_dict(load_file(path / "trainable.safetensors"), strict=False)
    assert not {n for n, p in model.named_parameters() if p.requires_grad} & set(missing), missing
    return meta, torch.load(path / "optimizer.pt", weights_only=True)


@torch.no_grad()
def evaluate(model, data: TensorDataset, batch: int) -> float:
    """Mean per-example loss over `data`."""
    was = model.training
    model.eval()
    x, y = data.tensors
    losses = [lm_loss(model, x[i:i + batch], y[i:i + batch]).item() * len(x[i:i + batch]) for i in range(0, len(x), batch)]
    model.train(was)
    return sum(losses) / len(x)


def non_private(cfg: Config, train: TensorDataset, steps: int) -> torch.nn.Module:
    """The same fine-tune without DP: same start, optimizer, steps and expected batch; shuffled
    fixed-size batches, no clipping, no noise."""
    model, _ = build(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.privacy.lr, weight_decay=0.0)
    loader = DataLoader(train, batch_size=cfg.privacy.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.run.seed))
    done = 0
    while done < steps:
        for x, y in loader:
            lm_loss(model, x, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
    return model


def main(argv=None) -> dict:
    if argv is None:  # from the command line (a Ray job's driver gets OMP_NUM_THREADS=1): every core
        torch.set_num_threads(os.cpu_count() or 1)
    # This stage is private by definition: privacy.enabled is set, so the config's checks for it
    # (e.g. no DeepSpeed ZeRO) apply.
    cfg = load_config([*(sys.argv[1:] if argv is None else argv), "--privacy.enabled=true"])
    p = cfg.privacy
    out = Path(RunPaths.of(cfg).stage("dp_finetune"))
    out.mkdir(parents=True, exist_ok=True)
    train, val, unit = private_set(cfg)
    model, base = build(cfg)
    expected = {"base": base["sha256"], "data": fingerprint(train),
                "params": p.params, "lora": cfg.lora.model_dump() if p.params == "lora" else None}
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=p.lr, weight_decay=0.0)
    saved = load_state(out / STATE, model, expected)
    if saved:
        opt.load_state_dict(saved[1])
    dp = apply_dp(model, opt, train, p, state=saved[0]["privacy"] if saved else None,
                  unit="user" if p.user_field else "example")
    start_step, start_eps = dp.steps, dp.epsilon()
    goal = min(dp.planned_steps, p.stop_after) if p.stop_after else dp.planned_steps
    wanted = max(0, goal - start_step)
    allowed = dp.steps_within_budget(wanted)
    print(f"dp_finetune: {len(train)} private examples ({unit}), sample rate {dp.sample_rate:.4g}, noise "
          f"{dp.noise_multiplier:.4g}, clip {p.max_grad_norm}; steps {start_step} -> {start_step + allowed} "
          f"of {dp.planned_steps} planned, epsilon so far {start_eps:.3f}", flush=True)
    history, t0 = (saved[0]["history"] if saved else []), time.perf_counter()

    def meta() -> dict:
        return {**expected, "step": dp.steps, "privacy": dp.state(), "history": history}

    while dp.steps < start_step + allowed:
        for x, y in dp.loader:
            loss = dp_backward(dp.module, x, y)
            dp.optimizer.step()
            dp.optimizer.zero_grad(set_to_none=True)
            history.append({"step": dp.steps, "loss": loss, "batch": len(x)})
            if dp.steps % cfg.train.log_every == 0 or dp.steps == start_step + allowed:
                print(f"dp_finetune: step {dp.steps} batch {len(x)} loss {loss if loss is None else round(loss, 4)} "
                      f"epsilon {dp.epsilon():.3f} elapsed {time.perf_counter() - t0:.1f}s", flush=True)
            if dp.steps % p.checkpoint_every == 0:
                save_state(out / STATE, model, dp.optimizer.original_optimizer, meta())
            if dp.steps == start_step + allowed:
                break
    save_state(out / STATE, model, dp.optimizer.original_optimizer, meta())
    epsilon = dp.epsilon()
    stopped, message = None, f"ran the planned {dp.planned_steps} steps"
    if allowed < wanted:
        stopped = "budget"
        message = (f"privacy budget: stopped after step {dp.steps} of {goal}: epsilon {epsilon:.3f} is within "
                   f"privacy.target_epsilon={p.target_epsilon}, and step {dp.steps + 1} would exceed it")
    elif dp.steps < dp.planned_steps:
        stopped, message = "stop_after", f"stopped after step {dp.steps} (privacy.stop_after={p.stop_after}); a later run resumes"
    print(f"dp_finetune: {message}", flush=True)

    # The export: the base model with this state's trainable weights, adapters merged.
    export, _ = build(cfg)
    export.load_state_dict(trainable_state(model), strict=False)
    merge_lora(export)
    report_cfg = cfg.to_dict()
    save_checkpoint(out / "model", export, report_cfg, step=dp.steps)
    base, _ = load_start(cfg, RunPaths.of(cfg).train_model, compute_dtype(cfg.train.dtype))
    batch = p.batch_size
    val_loss = {"base": evaluate(base, val, batch), "dp": evaluate(export, val, batch),
                "non_dp": evaluate(non_private(cfg, train, dp.steps), val, batch)}
    report = {
        "epsilon": round(epsilon, 4), "delta": p.delta, "target_epsilon": p.target_epsilon,
        "epsilon_at_start": round(start_eps, 4), "accountant": p.accountant,
        "noise_multiplier": dp.noise_multiplier, "max_grad_norm": p.max_grad_norm, "clipping": "flat, per example",
        "sample_rate": dp.sample_rate, "expected_batch_size": dp.sample_rate * len(train), "sampling": "Poisson",
        "steps": dp.steps, "steps_this_run": dp.steps - start_step, "planned_steps": dp.planned_steps,
        "privacy_unit": unit, "examples": len(train), "held_out_examples": len(val),
        "params": p.params, "trainable_params": sum(v.numel() for v in trainable_state(model).values()),
        "frozen": "MoE layers (router, experts, shared expert) and MTP: they mix examples' tokens in one matmul",
        "noise_seed": p.noise_seed if p.noise_seed >= 0 else "OS entropy",
        "val_loss": {k: round(v, 4) for k, v in val_loss.items()},
        "utility_cost": round(val_loss["dp"] - val_loss["non_dp"], 4),
        "stopped": stopped, "message": message, "model": str(out / "model"),
        "precision": describe(compute_dtype(cfg.train.dtype)),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"dp_finetune: epsilon {epsilon:.3f} (delta {p.delta}), val loss base {val_loss['base']:.3f} "
          f"dp {val_loss['dp']:.3f} non-dp {val_loss['non_dp']:.3f} -> {out / 'report.json'}", flush=True)
    return report


if __name__ == "__main__":
    main()
