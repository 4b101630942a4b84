"""Online learning: feedback -> replay buffer -> update on DeepSpeed ranks -> gate -> publish to Serve.

    python -m pipelines.online --config configs/tiny.yaml              # long-running: polls every online.poll_s
    python -m pipelines.online --config configs/tiny.yaml --once       # one poll, at most one update
    python -m pipelines.online --config configs/tiny.yaml --rollback   # serve the version before this one
    python -m pipelines.online --config configs/tiny.yaml --rollback v0001
    ray job submit --working-dir . -- python -m pipelines.online --config configs/small.yaml

Each poll moves new records from the FeedbackCollectors' stores into the ReplayBuffer (actors/replay.py).
Once `online.min_feedback` examples wait, an update draws up to `online.max_feedback` of them by
priority and trains the serving version on Ray Train workers that are DeepSpeed ranks: LoRA adapters
by default (merged afterwards), every weight with online.method=full. Each batch mixes a share
`online.feedback_fraction` of feedback sequences (corrected answers as targets with weight 1, good
answers weighted by their rating; loss on the answer tokens only, each sequence counting once) with
base pretraining windows, against forgetting. The candidate is quantized (quant.format) and its
artifact, loaded as Serve loads it, must pass the gate against the served artifact: held-out
perplexity up by `online.max_ppl_increase` at most, preference accuracy down by
`online.max_preference_drop` at most, every figure finite (the candidate's unquantized figures are
reported beside). Then it is published: the Serve app is redeployed with the new artifact, and Serve
replaces its replicas without dropping a request.
Versions live under <run>/online/versions/ and state.json names the one served; a candidate that
fails is kept there too, unpublished, and its examples are consumed (the report says why). Publishing
redeploys the running app from its own settings (key, limits) with the new artifact; it is
crash-safe: the update is recorded before its examples are consumed, the intent to publish before
Serve hears of it, and a rerun settles an unfinished publish with what Serve actually serves
(`reconcile`). Versions beyond online.keep_versions are deleted, never the served one or a rollback
target (`prune`); Ray Train's folder of an update is deleted once its model is copied out.
Each update writes <run>/online/updates/update-NNNN.json: feedback counts, buffer size and mix,
update loss, the gate's figures, the feedback targets' loss before and after, the version served and
the seconds from the newest feedback used to the new version serving.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from deepkiln.checkpoint import load_model, save_checkpoint
from deepkiln.config import Config, QuantArgs, load_config
from deepkiln.corpus import read_bytes, write_atomic
from deepkiln.data import TokenWindows
from deepkiln.evaluate import continuation_logprob, pad_rows, perplexity, sequence_losses, windows
from deepkiln.faults import kill_at
from deepkiln.paths import RunPaths, absolute, tokenizer_files, tokenizer_of
from deepkiln.precision import compute_dtype, describe
from deepkiln.preferences import encode_answer
from deepkiln.tokenizer import Tokenizer, load_tokenizer

APP = "deepkiln"  # the Serve application the online loop publishes to (serve/config.yaml, serve.app)


# -- the update: DeepSpeed ranks (deepkiln.update.update_loop) on Ray Train, or one in a Ray task -------

KIND = {"lora": "sft", "full": "sft", "dpo": "pair", "kto": "label", "grpo": "label"}
"""The replay buffer's kind of example each online.method learns from (GRPO: the labelled answers'
prompts)."""


def encode_examples(tok: Tokenizer, drawn: list[dict], method: str, max_len: int) -> list:
    """What deepkiln.update.update_loop takes for `method` (but grpo: `rollout_prompts`): supervised
    rows; (chosen, rejected) rows (dpo); (row, mismatched row, desirable) (kto: the mismatched row
    answers the prompt with the next example's answer, for the KL baseline)."""
    if KIND[method] == "sft":
        return [encode_answer(tok, e, e["target"], max_len) for e in drawn]
    if method == "dpo":
        return [(encode_answer(tok, e, e["chosen"], max_len), encode_answer(tok, e, e["rejected"], max_len))
                for e in drawn]
    return [(encode_answer(tok, e, e["chosen"], max_len),
             encode_answer(tok, e, drawn[(i + 1) % len(drawn)]["chosen"], max_len), bool(e["desirable"]))
            for i, e in enumerate(drawn)]


def rollout_prompts(tok: Tokenizer, drawn: list[dict], max_len: int) -> list[tuple[list[int], int]]:
    """GRPO's prompts, each once: (prompt ids, the stop id its answers end with), the prompt cut from
    the left to leave room for the answers."""
    seen, out = set(), []
    for e in drawn:
        key = (e["prompt"], e["completion_id"].startswith("chatcmpl-"))
        if key not in seen:
            seen.add(key)
            ids = encode_answer(tok, e, "", 1 << 30)[0]  # the prompt, then its stop token
            out.append((ids[:-1][-max_len:], ids[-1]))
    return out


def read_prompts(path: str) -> list[dict]:
    """online.prompts: one prompt a line, or jsonl of {"prompt"}; as buffer rows (plain prompts)."""
    raw = read_bytes(path)
    if raw is None:
        raise ValueError(f"online.prompts={path!r} does not exist")
    rows = []
    for i, line in enumerate(raw.decode().splitlines()):
        if line.strip():
            try:
                prompt = json.loads(line).get("prompt") if line.lstrip().startswith("{") else line
            except ValueError as e:
                raise ValueError(f"online.prompts line {i + 1} is not JSON: {e}") from None
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"online.prompts line {i + 1}: field 'prompt' is missing or not text")
            rows.append({"prompt": prompt, "completion_id": f"prompt-{i + 1}"})
    return rows


def reward_model_of(cfg: Config) -> str | None:
    """The reward model GRPO scores with (online.reward_model): a folder, the run's newest, or None."""
    on = cfg.online
    if on.reward_model == "latest":
        root = Path(RunPaths.of(cfg).reward("r0000")).parent
        done = sorted(p for p in root.glob("r[0-9][0-9][0-9][0-9]") if (p / "manifest.json").is_file()) \
            if root.is_dir() else []
        found = str(done[-1]) if done else None
    elif on.reward_model:
        if not Path(on.reward_model, "manifest.json").is_file():
            raise ValueError(f"online.reward_model={on.reward_model!r} is not a reward model folder "
                             "(written by pipelines.reward)")
        found = on.reward_model
    else:
        found = None
    if found is None and not on.rule_rewards:
        raise ValueError("online.method=grpo needs a reward: train one with pipelines.reward (online.reward_model="
                         f"{on.reward_model!r} found none) or name online.rule_rewards")
    return found


def favoured(method: str, encoded: list) -> tuple[list, list]:
    """The rows an update should make likelier and those it should make less likely: the supervised
    targets (and nothing); the chosen and rejected answers; the desirable and undesirable ones; for
    GRPO none (its gate samples answers)."""
    if KIND[method] == "sft":
        return encoded, []
    if method == "grpo":
        return [], []
    if method == "dpo":
        return [c for c, _ in encoded], [r for _, r in encoded]
    return [row for row, _, good in encoded if good], [row for row, _, good in encoded if not good]


def train_update(cfg: Config, base_model: str, encoded: list, weights: list[float], update: int,
                 base_first: int, reward_model: str | None = None) -> tuple[dict, str]:
    """Run the update: its ranks on Ray Train, or one rank in a Ray task (online.num_workers=1, the
    default: a worker group's process starts cost more than a small update's steps). Returns its
    metrics and a local folder holding the merged model."""
    from deepkiln.ray_utils import fit, one_rank, torch_trainer
    from deepkiln.update import OnlyRank, update_loop

    cfg = absolute(cfg)
    paths = RunPaths.of(cfg)
    storage, name = f"{paths.stage('online')}/ray", f"update-{update:04d}"
    paths.remove(os.path.join(storage, name))  # a crashed try of this update
    config = {"cfg": cfg.to_dict(), "base": os.path.abspath(base_model), "update": update, "examples": encoded,
              "weights": weights, "base_first": base_first, "reward_model": reward_model}
    if cfg.online.num_workers == 1:  # the storage is the run's, as Ray Train's is: shared on a cluster
        model = f"{storage}/{name}/model"
        return one_rank(update_loop, config, OnlyRank(model), cfg=cfg), model
    result = fit(torch_trainer(update_loop, config, cfg, name=name, storage=storage, workers=cfg.online.num_workers,
                               max_failures=1))
    out = tempfile.mkdtemp(prefix="deepkiln-update-")
    with result.checkpoint.as_directory() as d:
        shutil.copytree(Path(d) / "model", Path(out) / "model")
    paths.remove(os.path.join(storage, name))  # Ray Train's copy: the model is out
    return result.metrics, f"{out}/model"


# -- the gate ---------------------------------------------------------------------------------------

def preference_pairs(cfg: Config, tok: Tokenizer, data: TokenWindows) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token lists: online.preference_set, else held-out windows split in
    half, the real second half against the same tokens shuffled."""
    on = cfg.online
    if on.preference_set:
        raw = read_bytes(on.preference_set)
        if raw is None:
            raise ValueError(f"online.preference_set={on.preference_set!r} does not exist")
        pairs = []
        for i, line in enumerate(raw.decode().splitlines()):
            if line.strip():
                r = json.loads(line)
                missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(r.get(k), str)]
                if missing:
                    raise ValueError(f"online.preference_set line {i + 1}: field {missing[0]!r} is missing or not text")
                pairs.append((tok.encode_prompt(r["prompt"]), [*tok.encode(r["chosen"]), tok.eos_id],
                              [*tok.encode(r["rejected"]), tok.eos_id]))
        return pairs
    rng = np.random.default_rng(cfg.run.seed)
    pairs = []
    for k in range(on.preference_pairs):
        w = data.window(data.n_train + k % data.n_val).tolist()
        half = len(w) // 2
        pairs.append((w[:half], w[half:], [w[half:][i] for i in rng.permutation(len(w) - half)]))
    return pairs


@torch.no_grad()
def evaluate(cfg: Config, model, data: TokenWindows, pairs: list, good: list, bad: list,
             rollouts: tuple | None = None) -> dict:
    """Held-out perplexity, preference accuracy, the mean loss on the feedback's favoured rows (`good`:
    targets, chosen or desirable answers) and, with disfavoured rows (`bad`), the mean loss on them;
    with `rollouts` (GRPO's prompts, reward model folder) the mean reward of the model's greedy answers."""
    model.eval()
    prefs = [continuation_logprob(model, p, c) > continuation_logprob(model, p, r) for p, c, r in pairs]

    def loss(rows):
        return sum(sequence_losses(model(x).logits, y).item() for x, y in (pad_rows([e]) for e in rows)) / len(rows)

    figures = {"perplexity": perplexity(model, data, cfg.train.batch_size, cfg.train.eval_batches),
               "preference_accuracy": sum(prefs) / max(1, len(prefs)),
               "feedback_target_loss": loss(good) if good else 0.0}
    if bad:
        figures["disfavoured_loss"] = loss(bad)
    if rollouts:
        from deepkiln.preferences import load_reward
        from deepkiln.update import sampled_reward

        prompts, reward_model = rollouts
        figures["sampled_reward"] = sampled_reward(model, prompts, cfg,
                                                   load_reward(reward_model)[0] if reward_model else None)
    return figures


def judge(cfg: Config, served_artifact: str, candidate_model: str, candidate_artifact: str, data: TokenWindows,
          pairs: list, good: list, bad: list, rollouts: tuple | None = None) -> dict:
    """The gate's verdict on the candidate's quantized artifact (what publishing would serve) against
    the served artifact, both loaded as Serve loads them; the candidate's unquantized figures are
    reported beside them (`candidate_unquantized`), so a broken quantization shows as such."""
    from deepkiln.quantize import load_quantized

    dtype = compute_dtype(cfg.serve.dtype)
    served = evaluate(cfg, load_quantized(served_artifact, dtype)[0], data, pairs, good, bad, rollouts)
    try:
        candidate = load_quantized(candidate_artifact, dtype)[0]
    except (ValueError, OSError, RuntimeError) as e:  # what Serve would fail to load is refused here
        return {"passed": False, "reasons": [f"the candidate's artifact {candidate_artifact} does not load: {e}"],
                "current": served, "candidate": None, "candidate_unquantized": None}
    verdict = gate(cfg, served, evaluate(cfg, candidate, data, pairs, good, bad, rollouts))
    verdict["candidate_unquantized"] = evaluate(cfg, load_model(candidate_model, dtype=dtype)[0], data, pairs, good,
                                                bad, rollouts)
    return verdict


def gate(cfg: Config, current: dict, candidate: dict) -> dict:
    on = cfg.online
    reasons = [f"{side} {key} is {value} (not a finite number)" for side, figures in
               (("the serving version's", current), ("the candidate's", candidate))
               for key, value in figures.items() if not math.isfinite(value)]
    limit = current["perplexity"] * (1 + on.max_ppl_increase)
    if candidate["perplexity"] > limit:
        reasons.append(f"held-out perplexity {candidate['perplexity']:.3f} exceeds {limit:.3f} (the serving "
                       f"version's {current['perplexity']:.3f} + online.max_ppl_increase={on.max_ppl_increase})")
    floor = current["preference_accuracy"] - on.max_preference_drop
    if candidate["preference_accuracy"] < floor:
        reasons.append(f"preference accuracy {candidate['preference_accuracy']:.3f} is below {floor:.3f} (the serving "
                       f"version's {current['preference_accuracy']:.3f} - online.max_preference_drop={on.max_preference_drop})")
    if "sampled_reward" in current and not candidate["sampled_reward"] >= current["sampled_reward"]:
        reasons.append("the mean reward of greedy answers to the update's prompts fell: "
                       f"{candidate['sampled_reward']:.4f} against the serving version's "
                       f"{current['sampled_reward']:.4f}")
    if "disfavoured_loss" in current:  # a preference update must widen the gap it was asked to widen
        gap = {side: f["disfavoured_loss"] - f["feedback_target_loss"] for side, f in
               (("current", current), ("candidate", candidate))}
        if not gap["candidate"] > gap["current"]:
            reasons.append(f"the feedback's disfavoured answers are not less likely than its favoured ones by more "
                           f"than before: loss gap {gap['candidate']:.3f} against the serving version's "
                           f"{gap['current']:.3f}")
    return {"passed": not reasons, "reasons": reasons, "current": current, "candidate": candidate}


# -- versions and publishing -------------------------------------------------------------------------

def load_state(cfg: Config) -> dict:
    """Versions, the one served, the update count and the base-data cursor. The first time: version
    v0000 is the run's final model (the DP fine-tune's when privacy.enabled, else the training
    export) and the artifact Serve loads."""
    paths = RunPaths.of(cfg)
    raw = read_bytes(paths.online_state)
    if raw is not None:
        return json.loads(raw)
    model, artifact = paths.final_model, paths.artifact
    for what, path in (("the final model", model), ("the quantized artifact", artifact)):
        if not Path(path, "manifest.json").is_file():
            raise ValueError(f"{what} {path} is missing: run pipelines.train and pipelines.quantize first")
    return {"current": "v0000", "history": ["v0000"], "updates": 0, "base_cursor": 0,
            "versions": {"v0000": {"model": os.path.abspath(model), "artifact": os.path.abspath(artifact),
                                   "published": True}}}


def save_state(cfg: Config, state: dict) -> None:
    write_atomic(RunPaths.of(cfg).online_state, json.dumps(state, indent=1).encode())


def quantize_version(cfg: Config, model_dir: str, out: Path, tokenizer: str) -> str:
    """The serving artifact of a version (quant.format), carrying `tokenizer` (its parent's)."""
    from deepkiln.quantize import apply_quantization

    model, ckpt = load_model(model_dir)
    args = QuantArgs(**cfg.quant.model_dump())
    model = apply_quantization(model, args)
    return str(save_checkpoint(out, model, {**ckpt.config, "quant": args.model_dump()},
                               step=ckpt.manifest.get("step", 0), tokens=ckpt.manifest.get("tokens", 0),
                               files=tokenizer_files(tokenizer)))


def served_version() -> str | None:
    """The version the running Serve app serves (its LLMServer's), None when the app is not running."""
    from ray import serve

    if APP not in serve.status().applications:
        return None
    return serve.get_deployment_handle("LLMServer", app_name=APP).info.remote().result()["version"]


def publish(artifact: str) -> bool:
    """Redeploy the running Serve app with `artifact` and wait until its replicas serve it. Everything
    else is the running app's own (its config and key, from OpenAIIngress.settings), not this job's:
    a new version changes the artifact and nothing else. False (nothing done) when the app is not
    running."""
    from ray import serve

    from deepkiln.paths import version_of
    from serve.app import build

    if APP not in serve.status().applications:
        print(f"online: the Serve app {APP!r} is not running; {artifact} is ready but not published", flush=True)
        return False
    settings = serve.get_app_handle(APP).settings.remote().result()
    serve.run(build(Config.from_dict(settings["config"]), artifact=artifact, api_key_sha256=settings["api_key_sha256"]),
              name=APP, route_prefix="/")  # returns once the app is running
    want = version_of(artifact)
    deadline = time.monotonic() + 300
    while served_version() != want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"Serve did not switch to {want} within 300 s")
        time.sleep(0.5)
    return True


def serve_version(cfg: Config, state: dict, name: str) -> bool:
    """Publish version `name` crash-safely: the intent is saved first, so a run killed at any moment
    finds it and `reconcile` settles what Serve actually serves. True once Serve serves it."""
    from ray.exceptions import RayError

    state["publishing"] = name
    save_state(cfg, state)
    published = False
    try:
        published = publish(state["versions"][name]["artifact"])
    except (RuntimeError, RayError) as e:
        print(f"online: publishing {name} failed ({type(e).__name__}: {e}); checking what Serve serves", flush=True)
    kill_at("switched")
    reconcile(cfg, state)
    return published and state["current"] == name


def reconcile(cfg: Config, state: dict) -> dict:
    """Settle a publish that was under way (state["publishing"]) with the version Serve serves: if
    it is the intended one, that version is current; else the state stays as it was. Saved."""
    from deepkiln.paths import version_of

    name = state.pop("publishing", None)
    if name is None:
        return state
    served = served_version()
    if served is not None and served == version_of(state["versions"][name]["artifact"]):
        state["versions"][name]["published"] = True
        if state["current"] != name:
            state["current"] = name
            state["history"].append(name)
    else:
        print(f"online: {name} was being published and Serve serves {served or 'nothing'}: serving "
              f"{state['current']} stays the state", flush=True)
    save_state(cfg, state)
    return state


def prune(cfg: Config, state: dict) -> list[str]:
    """Delete the folders of versions beyond online.keep_versions: never the one served, the last
    keep_versions served (the rollback targets), one being published, or the newest keep_versions
    made; v0000 (the run's own model and artifact) is never under versions/. Returns those pruned."""
    paths = RunPaths.of(cfg)
    keep_n = cfg.online.keep_versions
    made = sorted(state["versions"])
    keep = {state["current"], "v0000", *state["history"][-keep_n:], *made[-keep_n:]}
    if state.get("publishing"):
        keep.add(state["publishing"])
    pruned = []
    for name in made:
        version = state["versions"][name]
        if name in keep or version.get("pruned"):
            continue
        paths.remove(paths.version(name))
        version.update(pruned=True, model=None, artifact=None)
        pruned.append(name)
    if pruned:
        save_state(cfg, state)
    return pruned


# -- the loop ---------------------------------------------------------------------------------------

def poll(cfg: Config, buffer, collectors) -> dict:
    """Move new feedback from every collector's store into the buffer."""
    import ray

    totals = {"added": 0, "not_trainable": 0, "dropped": 0}
    for i, collector in enumerate(collectors):  # page by page: bounded however long the loop was down
        name = f"collector-{i}"
        while page := ray.get(collector.records.remote(ray.get(buffer.offset.remote(name)))):
            for k, n in ray.get(buffer.ingest.remote(name, page)).items():
                totals[k] += n
    return totals


KIND_NAMES = {"sft": "examples", "pair": "pairs", "label": "labelled answers"}


def feedback_counts(drawn: list[dict], kind: str) -> dict[str, int]:
    """What an update's examples were: corrected or rated (sft); from corrections or rankings (pairs);
    desirable or not (labels)."""
    if kind == "sft":
        return {"corrected": sum(e["corrected"] for e in drawn), "rated": sum(not e["corrected"] for e in drawn)}
    if kind == "pair":
        return {"corrections": sum(e["part"] == "correction" for e in drawn),
                "ranked": sum(e["part"] != "correction" for e in drawn)}
    good = sum(bool(e["desirable"]) for e in drawn)
    return {"desirable": good, "undesirable": len(drawn) - good}


def preference_figures(metrics: dict) -> dict:
    """A preference update's curves for its report, a step per entry: its preference loss; for DPO
    and KTO the mean implicit reward (beta * log pi/pi_ref) of chosen/desirable and rejected/undesirable
    answers, their margin, and KTO's KL baseline (None where a batch had no answer of that kind); for
    GRPO the rollout's mean reward, the mean probability ratio, the share of tokens clipped and the KL
    to the reference. Empty for SFT."""
    if "curves" not in metrics:
        return {}
    curves = {k: [None if math.isnan(v) else v for v in values] for k, values in metrics["curves"].items()}
    if "reward_chosen" in curves:
        curves["margin"] = [None if c is None or r is None else c - r
                            for c, r in zip(curves["reward_chosen"], curves["reward_rejected"])]
    return {"curves": curves, **({"kto_weights": metrics["kto_weights"]} if "kto_weights" in metrics else {})}


def shares(drawn: list[dict]) -> dict[str, float]:
    """Each client's share of an update's examples (online.max_share_per_source bounds it)."""
    counts = Counter(e["client"] for e in drawn)
    return {c: round(k / len(drawn), 4) for c, k in sorted(counts.items())}


def run_update(cfg: Config, buffer, state: dict) -> dict:
    """One update from the buffer's best examples: train, gate, and publish if it passes."""
    import ray

    from actors.replay import key_of

    on = cfg.online
    update = state["updates"] + 1
    started = time.time()
    kind = KIND[on.method]
    drawn = ray.get(buffer.draw.remote(on.max_feedback, cfg.run.seed + update, None, on.max_share_per_source, kind))
    paths = RunPaths.of(cfg)
    current = state["versions"][state["current"]]
    tokenizer = tokenizer_of(cfg, current["artifact"])  # the served version's: the ids its model knows
    tok = load_tokenizer(tokenizer)
    rollouts, reward_model = None, None
    if on.method == "grpo":
        reward_model = reward_model_of(cfg)
        extra = read_prompts(on.prompts) if on.prompts else []
        encoded = rollout_prompts(tok, drawn + extra, cfg.model.max_seq_len - on.max_new_tokens - 1)
        rollouts = (encoded, reward_model)
    else:
        encoded = encode_examples(tok, drawn, on.method, cfg.model.max_seq_len)
    weights = [e["weight"] for e in drawn]
    print(f"online: update {update} ({on.method}): {len(drawn)} feedback {KIND_NAMES[kind]} on {state['current']}",
          flush=True)
    timings = {}
    mark = time.perf_counter()
    metrics, model_dir = train_update(cfg, current["model"], encoded, weights, update, state["base_cursor"],
                                      reward_model)
    timings["train_s"], mark = round(time.perf_counter() - mark, 1), time.perf_counter()
    name = f"v{update:04d}"
    if name in state["versions"]:
        raise RuntimeError(f"{name} is in {paths.online_state} already: refusing to overwrite it")
    folder = Path(paths.version(name))
    paths.remove(folder)  # a try of this update that crashed before the state named it
    folder.mkdir(parents=True)
    shutil.copytree(model_dir, folder / "model")
    shutil.rmtree(Path(model_dir).parent, ignore_errors=True)
    kill_at("trained")

    # The gate judges what would be served: the candidate's quantized artifact against the served one.
    artifact = quantize_version(cfg, str(folder / "model"), folder / f"{name}-{cfg.quant.format}", tokenizer)
    timings["quantize_s"], mark = round(time.perf_counter() - mark, 1), time.perf_counter()
    data = windows(cfg)
    verdict = judge(cfg, current["artifact"], str(folder / "model"), artifact, data,
                    preference_pairs(cfg, tok, data), *favoured(on.method, encoded), rollouts)
    timings["gate_s"], mark = round(time.perf_counter() - mark, 1), time.perf_counter()
    # The update is recorded before its examples are consumed and before Serve hears of it: a crash
    # after this point never redoes it, and never deletes a folder the state names.
    state["versions"][name] = {"model": str(folder / "model"), "artifact": artifact, "published": False,
                               "parent": state["current"], "gate": verdict}
    state["updates"] = update
    state["base_cursor"] += on.steps * metrics["base_per_batch"]
    save_state(cfg, state)
    kill_at("recorded")
    ray.get(buffer.commit.remote([key_of(e) for e in drawn], update, kind))
    kill_at("consumed")
    published_at = None
    if verdict["passed"] and on.publish and serve_version(cfg, state, name):
        timings["publish_s"] = round(time.perf_counter() - mark, 1)
        published_at = time.time()
    kill_at("published")
    pruned = prune(cfg, state)
    newest = max(e["created"] for e in drawn)
    report = {
        "update": update, "version": name, "parent": state["versions"][name]["parent"], "serving": state["current"],
        "feedback": {"examples": len(drawn), "kind": kind, **feedback_counts(drawn, kind),
                     "mean_weight": float(np.mean(weights)), "sources": shares(drawn)},
        "buffer": ray.get(buffer.stats.remote()),
        "mix": {"feedback_per_batch": metrics["feedback_per_batch"], "base_per_batch": metrics["base_per_batch"]},
        "method": on.method, "ranks": metrics["ranks"], "steps": on.steps,
        "precision": {"update": metrics["precision"], "gate": describe(compute_dtype(cfg.serve.dtype))},
        "loss_first": metrics["loss_first"], "loss_last": metrics["loss_last"],
        "losses": metrics["losses"], **preference_figures(metrics),
        "gate": verdict, "published": state["versions"][name]["published"],
        "pruned": pruned,
        "seconds": round(time.time() - started, 1), "timings": timings,
        "feedback_to_serving_s": round(published_at - newest, 1) if published_at else None,
    }
    write_atomic(paths.update_report(update), json.dumps(report, indent=1).encode())
    _record_metrics(report)
    print(f"online: update {update}: loss {report['loss_first']:.3f} -> {report['loss_last']:.3f}; gate "
          f"{'passed' if verdict['passed'] else 'failed: ' + '; '.join(verdict['reasons'])}; serving "
          f"{state['current']}" + (f" ({report['feedback_to_serving_s']} s after the newest feedback)"
                                   if published_at else ""), flush=True)
    return report


def rollback(cfg: Config, to: str | None) -> dict:
    """Serve an earlier version again: `to`, or the one served before the current one."""
    from deepkiln.ray_utils import init_ray

    state = load_state(cfg)
    if state.get("publishing"):  # a publish a killed run left under way: settled first
        init_ray()
        reconcile(cfg, state)
    if to is None:
        if len(state["history"]) < 2:
            raise ValueError(f"nothing to roll back to: {state['current']} is the only version served so far")
        to = state["history"][-2]
    servable = sorted(v for v, info in state["versions"].items()
                      if info.get("artifact") and info.get("gate", {"passed": True})["passed"])
    if to not in servable:
        raise ValueError(f"--rollback {to}: not a kept version that passed the gate (these are: {servable})")
    version = state["versions"][to]
    init_ray()  # only now: a refused rollback needs no cluster
    if served_version() is None:
        raise ValueError(f"the Serve app {APP!r} is not running: nothing to roll back")
    if not serve_version(cfg, state, to):
        raise RuntimeError(f"Serve did not switch to {to}; it serves {state['current']} ({served_version()})")
    print(f"online: serving {to} again ({version['artifact']})", flush=True)
    return {"serving": to, "artifact": version["artifact"]}


_GAUGES: dict = {}


def _record_metrics(report: dict) -> None:
    """Prometheus: buffer size, update loss, the version served, feedback-to-serving time."""
    from ray.util.metrics import Counter, Gauge

    if not _GAUGES:
        _GAUGES.update(
            buffer=Gauge("deepkiln_online_buffer_unconsumed", "feedback examples waiting in the replay buffer"),
            loss=Gauge("deepkiln_online_update_loss", "last training loss of the newest update"),
            serving=Gauge("deepkiln_online_serving_update", "update number of the version served"),
            latency=Gauge("deepkiln_online_feedback_to_serving_s", "seconds from the newest feedback to serving"),
            margin=Gauge("deepkiln_online_update_margin", "last reward margin of the newest preference update "
                         "(chosen or desirable minus rejected or undesirable, beta * log pi/pi_ref)"),
            reward=Gauge("deepkiln_online_update_reward", "last reward of the newest preference update: the chosen "
                         "or desirable answers' implicit reward (dpo, kto), the rollouts' mean reward (grpo)"),
            updates=Counter("deepkiln_online_updates", "updates by outcome", tag_keys=("outcome",)))
    _GAUGES["buffer"].set(report["buffer"]["unconsumed"])
    _GAUGES["loss"].set(report["loss_last"])
    _GAUGES["serving"].set(int(report["serving"][1:]))
    if report["feedback_to_serving_s"] is not None:
        _GAUGES["latency"].set(report["feedback_to_serving_s"])
    curves = report.get("curves", {})
    for gauge, key in (("margin", "margin"), ("reward", "reward_chosen"), ("reward", "reward")):
        values = [v for v in curves.get(key, []) if v is not None]
        if values:
            _GAUGES[gauge].set(values[-1])
    outcome = "published" if report["published"] else "passed" if report["gate"]["passed"] else "rejected"
    _GAUGES["updates"].inc(tags={"outcome": outcome})


def main(argv=None) -> dict:
    import ray

    from actors.feedback import collectors
    from actors.replay import replay_buffer
    from deepkiln.ray_utils import init_ray

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--once", action="store_true")
    p.add_argument("--rollback", nargs="?", const="", default=None)
    opts, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(rest)
    if opts.rollback is not None:
        return rollback(cfg, opts.rollback or None)
    if cfg.online.method == "grpo":  # what GRPO needs is there before any update waits for it
        reward_model_of(cfg)
        if cfg.online.prompts:
            read_prompts(cfg.online.prompts)
    init_ray()
    torch.set_num_threads(os.cpu_count() or 1)
    buffer, sources = replay_buffer(cfg), collectors(cfg)
    reconcile(cfg, load_state(cfg))  # a publish a killed run left under way
    last: dict = {}
    while True:
        state = load_state(cfg)
        counts = poll(cfg, buffer, sources)
        waiting = ray.get(buffer.size.remote(KIND[cfg.online.method]))
        if counts["added"] or opts.once:
            print(f"online: {counts['added']} new supervised examples ({counts['not_trainable']} records without "
                  f"one, {counts['dropped']} dropped); {waiting} {KIND_NAMES[KIND[cfg.online.method]]} wait for "
                  f"{cfg.online.method}, {cfg.online.min_feedback} start an update", flush=True)
        if waiting >= cfg.online.min_feedback:
            last = run_update(cfg, buffer, state)
        if opts.once:
            return last or {"update": None, "waiting": waiting, "serving": state["current"]}
        time.sleep(cfg.online.poll_s)


if __name__ == "__main__":
    main()
