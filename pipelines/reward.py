"""Reward model from feedback: a scalar head on the serving version's last hidden state, trained on
preference pairs (Bradley-Terry, with the rating difference as margin) and on labelled answers
(desirable or not), its pair accuracy on held-out prompts reported.

    python -m pipelines.reward --config configs/tiny.yaml
    python -m pipelines.reward --config configs/tiny.yaml --reward.pairs=prefs.jsonl
    ray job submit --working-dir . -- python -m pipelines.reward --config configs/small.yaml

The data: every record of the run's feedback stores, read from their SQLite files (a job's driver
runs on the head node, where they are), turned into pairs and labels as deepkiln.preferences says
(with the ranked pairs between ratings of one prompt), and the pairs of reward.pairs. A keyed hash of
the prompt holds out reward.holdout_fraction of the prompts, all their pairs and labels with them.
The backbone starts from the serving version (the online loop's current one, else the run's final
model) and trains every weight; the score head starts at 0, so every reward starts at 0.
Each run writes the next version <run>/online/rewards/rNNNN/ (weights, config, the serving version's
tokenizer, report.json: held-out and training pair accuracy, losses) and never overwrites one.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from deepkiln.checkpoint import load_model, save_checkpoint
from deepkiln.config import Config, load_config
from deepkiln.corpus import read_bytes, write_atomic
from deepkiln.paths import RunPaths, tokenizer_files, tokenizer_of
from deepkiln.preferences import (Label, Pair, RewardModel, bradley_terry_loss, encode_answer, preference_items,
                                  ranked_pair, reward_inputs)
from deepkiln.tokenizer import load_tokenizer


def serving(cfg: Config) -> tuple[str, str]:
    """(model folder, artifact) of the version served: the online loop's current one, else the run's."""
    paths = RunPaths.of(cfg)
    raw = read_bytes(paths.online_state)
    if raw is None:
        for what, path in (("the final model", paths.final_model), ("the quantized artifact", paths.artifact)):
            if not Path(path, "manifest.json").is_file():
                raise ValueError(f"{what} {path} is missing: run pipelines.train and pipelines.quantize first")
        return paths.final_model, paths.artifact
    state = json.loads(raw)
    version = state["versions"][state["current"]]
    return version["model"], version["artifact"]


def feedback_items(cfg: Config) -> list[tuple[Pair | Label, str]]:
    """(pair or label, completion id) from every record of the run's feedback stores."""
    from actors.feedback import FeedbackCollector

    paths, items, by_prompt = RunPaths.of(cfg), [], defaultdict(list)
    for i in range(cfg.feedback.collectors):
        if not Path(paths.collector_db(i)).is_file():
            continue
        for r in FeedbackCollector(paths.collector_db(i), cfg.feedback.model_dump()).all_records():
            items += [(item, r["completion_id"]) for item in preference_items(r, cfg.feedback, cfg.online)]
            if r["completion"]:
                by_prompt[r["prompt"]].append(r)
    for records in by_prompt.values():  # every two ratings of one prompt
        for k, a in enumerate(records):
            items += [(p, a["completion_id"]) for b in records[k + 1:] if (p := ranked_pair(a, b, cfg.feedback))]
    return items


def user_pairs(path: str) -> list[tuple[Pair, str]]:
    raw = read_bytes(path)
    if raw is None:
        raise ValueError(f"reward.pairs={path!r} does not exist")
    pairs = []
    for i, line in enumerate(raw.decode().splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise ValueError(f"reward.pairs line {i + 1} is not JSON: {e}") from None
        if not isinstance(r, dict):
            raise ValueError(f"reward.pairs line {i + 1}: expected an object with prompt, chosen and rejected")
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(r.get(k), str)]
        if missing:
            raise ValueError(f"reward.pairs line {i + 1}: field {missing[0]!r} is missing or not text")
        margin = r.get("margin", 0.0)
        if not isinstance(margin, (int, float)) or margin < 0:
            raise ValueError(f"reward.pairs line {i + 1}: margin={margin!r} must be a number >= 0")
        pairs.append((Pair(r["prompt"], r["chosen"], r["rejected"], float(margin)), ""))
    return pairs


def held_out(prompt: str, fraction: float) -> bool:
    """Whether a prompt (and everything about it) is held out: a keyed hash, stable across runs."""
    return zlib.crc32(b"deepkiln-reward:" + prompt.encode()) % 10_000 < fraction * 10_000


@torch.no_grad()
def pair_accuracy(model: RewardModel, pairs: list[tuple[list[int], list[int], float]], size: int) -> float | None:
    """Share of pairs whose chosen answer the model scores above the rejected one (None: no pairs)."""
    if not pairs:
        return None
    model.eval()
    right = 0
    for start in range(0, len(pairs), size):
        chunk = pairs[start:start + size]
        r = model(*reward_inputs([c for c, _, _ in chunk] + [r for _, r, _ in chunk]))
        right += (r[:len(chunk)] > r[len(chunk):]).sum().item()
    model.train()
    return right / len(pairs)


def main(argv=None) -> dict:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(cfg.run.seed)
    a, paths = cfg.reward, RunPaths.of(cfg)
    model_dir, artifact = serving(cfg)
    tokenizer = tokenizer_of(cfg, artifact)
    tok = load_tokenizer(tokenizer)
    items = feedback_items(cfg) + (user_pairs(a.pairs) if a.pairs else [])

    def ids(item, cid, answer):
        return encode_answer(tok, {"prompt": item.prompt, "completion_id": cid}, answer, cfg.model.max_seq_len)[0]

    split = {True: {"pairs": [], "labels": []}, False: {"pairs": [], "labels": []}}
    for item, cid in items:
        side = split[held_out(item.prompt, a.holdout_fraction)]
        if isinstance(item, Pair):
            side["pairs"].append((ids(item, cid, item.chosen), ids(item, cid, item.rejected), item.margin))
        else:
            side["labels"].append((ids(item, cid, item.completion), float(item.desirable)))
    train, test = split[False], split[True]
    if not train["pairs"]:
        raise ValueError(f"no preference pair to train on outside the held-out prompts ({len(test['pairs'])} held "
                         "out): give feedback with corrections or several ratings of a prompt, or reward.pairs")
    print(f"reward: {len(train['pairs'])} pairs and {len(train['labels'])} labelled answers to train on, "
          f"{len(test['pairs'])} pairs held out; from {model_dir}", flush=True)

    model = RewardModel(load_model(model_dir)[0]).train()
    opt = torch.optim.AdamW([{"params": model.backbone.parameters(), "lr": a.lr},
                             {"params": model.score.parameters(), "lr": a.lr * 10}], weight_decay=0.0)
    rng = random.Random(cfg.run.seed)
    losses, started = [], time.perf_counter()
    for step in range(a.steps):
        pairs = rng.sample(train["pairs"], min(a.batch_size, len(train["pairs"])))
        n = len(pairs)
        labels = rng.sample(train["labels"], min(a.batch_size, len(train["labels"])))
        r = model(*reward_inputs([c for c, _, _ in pairs] + [r for _, r, _ in pairs] + [x for x, _ in labels]))
        loss = bradley_terry_loss(r[:n], r[n:2 * n], torch.tensor([m for _, _, m in pairs])).mean()
        if labels:
            loss = loss + F.binary_cross_entropy_with_logits(r[2 * n:], torch.tensor([y for _, y in labels]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % max(1, a.steps // 5) == 0 or step + 1 == a.steps:
            print(f"reward: step {step + 1}/{a.steps} loss {loss.item():.4f}", flush=True)
    report = {"source": str(model_dir), "pairs": {"train": len(train["pairs"]), "heldout": len(test["pairs"])},
              "labels": len(train["labels"]), "steps": a.steps, "loss_first": losses[0], "loss_last": losses[-1],
              "losses": losses, "seconds": round(time.perf_counter() - started, 1),
              "train_pair_accuracy": pair_accuracy(model, train["pairs"], a.batch_size),
              "heldout_pair_accuracy": pair_accuracy(model, test["pairs"], a.batch_size)}
    root = Path(paths.reward("r0000")).parent
    done = sorted(p.name for p in root.glob("r[0-9][0-9][0-9][0-9]")) if root.is_dir() else []
    name = f"r{int(done[-1][1:]) + 1 if done else 1:04d}"
    out = save_checkpoint(paths.reward(name), model, cfg.to_dict(), files=tokenizer_files(tokenizer))
    report["version"], report["path"] = name, str(out)
    write_atomic(str(out / "report.json"), json.dumps(report, indent=1).encode())
    held = report["heldout_pair_accuracy"]
    print(f"reward: {name}: pair accuracy {'n/a' if held is None else f'{held:.3f}'} held out "
          f"({len(test['pairs'])} pairs), {report['train_pair_accuracy']:.3f} trained on; {out}", flush=True)
    return report


if __name__ == "__main__":
    main()
