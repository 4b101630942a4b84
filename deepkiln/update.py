"""The ranks of an online update (run by pipelines.online): DeepSpeed ranks that train the serving
version on feedback, as a Ray Train worker group (`UpdateRank`) or, for one rank, in a Ray task
(`OnlyRank`, under deepkiln.trainer.as_only_rank). By online.method:

- lora, full: supervised, on corrected and well-rated answers (loss on the answer tokens).
- dpo: on preference pairs; kto: on answers labelled desirable or not (deepkiln.preferences). The
  reference is the model as loaded (the serving version): its log-probabilities of every example a
  rank draws are computed once, before the first step.
- grpo: on the feedback's prompts: every online.iterations steps a rollout samples
  online.group_size answers to each prompt with deepkiln's engine (from the current weights, LoRA
  merged into a copy), scores them (the reward model, rule rewards), and the next steps follow the
  clipped, KL-regularised GRPO objective on them with the rollout's expert choices replayed, so the
  MoE routing the update sees is the routing the rollout took.

Every batch mixes in base pretraining windows (online.feedback_fraction) against forgetting; the
routers' balancing bias steps after every optimizer step, as in pretraining. Ray is imported inside
the functions, so importing the library stays Ray-free.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from deepkiln.config import Config
from deepkiln.evaluate import IGNORE, pad_rows, sequence_losses, windows
from deepkiln.preferences import (dpo_loss, group_advantages, grpo_loss, kto_loss, kto_weights, recorded_routes,
                                  replayed_routes, reward_inputs, rule_rewards, sequence_logps, token_logps)
from deepkiln.training import deepspeed_config, initialize, update_expert_bias


class OnlyRank:
    """The one rank of an update that runs in its own process, without a worker group (in a Ray
    task). Its model goes to `out`, its metrics are returned."""
    rank, world = 0, 1

    def __init__(self, out: str):
        self.out = out

    def report(self, metrics: dict, folder: str) -> dict:
        import shutil

        shutil.rmtree(self.out, ignore_errors=True)  # a retried try's
        shutil.copytree(Path(folder) / "model", self.out)
        return metrics


class UpdateRank:
    """A rank of an online update's Ray Train worker group: rank 0's merged model goes to Ray Train."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def report(self, metrics: dict, folder: str) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if self.rank == 0 else None)


def update_loop(config: dict, rank_of: UpdateRank | OnlyRank | None = None):
    """One DeepSpeed rank of an online update. Depends only on `config`: the resolved config, the base
    model folder, the encoded examples, and the base-data cursor. The examples are, by online.method:
    supervised rows (ids, labels) with `weights`; (chosen row, rejected row) pairs (dpo); (row,
    mismatched row, desirable) (kto: the mismatched row, the prompt with another example's answer,
    feeds the KL baseline); (prompt ids, stop id) prompts (grpo, with `reward_model`: a folder or
    None). Each feedback sequence, pair or group counts once beside the base windows. `rank_of`:
    where it runs (a Ray Train worker unless told otherwise); returns what its report does."""
    import torch.distributed as dist

    from deepkiln.checkpoint import load_model, save_checkpoint
    from deepkiln.faults import kill_once
    from deepkiln.lora import apply_lora, lora_parameters, merge_lora
    from deepkiln.precision import compute_dtype, describe

    cfg = Config.from_dict(config["cfg"])
    on, method = cfg.online, cfg.online.method
    place = rank_of or UpdateRank()
    rank, world = place.rank, place.world
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.run.seed + config["update"])
    model, base = load_model(config["base"])
    frozen = copy.deepcopy(model).eval().requires_grad_(False) if method == "grpo" else None  # GRPO's reference
    lora = (method if method in ("lora", "full") else on.params) == "lora"
    if lora:
        apply_lora(model, cfg.lora)
        params = lora_parameters(model)
    else:
        params = list(model.parameters())
    micro = on.batch_size // world
    dtype = compute_dtype(cfg.train.dtype)
    warmup = max(1, on.steps // 10)
    engine = initialize(model, params, lr=on.lr, weight_decay=0.0, schedule=lambda s: min(1.0, (s + 1) / warmup),
                        ds_config=deepspeed_config(batch_size=on.batch_size, micro_batch=micro, grad_accum=1,
                                                   grad_clip=cfg.train.grad_clip, dtype=dtype,
                                                   zero_stage=0 if lora else cfg.train.zero_stage))
    examples, weights = config["examples"], config["weights"]
    n_fb = min(micro, max(1, round(micro * on.feedback_fraction))) if examples and on.feedback_fraction else 0
    n_base = micro - n_fb
    if method == "grpo" and n_fb:  # prompts per batch: their groups take the feedback share's place
        n_fb = max(1, n_fb // on.group_size)
    data = windows(cfg) if n_base else None
    orders: dict[int, np.ndarray] = {}

    def picks(step: int) -> list[int]:
        """The examples of this rank's batch at `step`: an epoch over them is a seeded permutation."""
        out = []
        for j in range(n_fb):
            epoch, k = divmod((step * world + rank) * n_fb + j, len(examples))
            order = orders.setdefault(epoch, np.random.default_rng((cfg.run.seed, config["update"], epoch))
                                      .permutation(len(examples)))
            out.append(int(order[k]))
        return out

    ref = reference_logps(engine, examples, sorted({i for s in range(on.steps) for i in picks(s)}), micro) \
        if method in ("dpo", "kto") and n_fb else {}
    desirable_w, undesirable_w = kto_weights(sum(e[2] for e in examples), sum(not e[2] for e in examples)) \
        if method == "kto" else (1.0, 1.0)
    reward_model = None
    if method == "grpo" and config.get("reward_model"):
        from deepkiln.preferences import load_reward

        reward_model = load_reward(config["reward_model"])[0]
    losses, curves, roll = [], {}, None
    for step in range(on.steps):
        idx = picks(step // on.iterations if method == "grpo" else step)  # a rollout serves `iterations` steps
        base_rows = []
        if n_base:
            x, y = data.train_batch(config["base_first"] + (step * world + rank) * n_base, n_base)
            base_rows = [(ids, ids) for ids in torch.cat([x, y[:, -1:]], dim=1).tolist()]  # every token a target
        figures: dict[str, torch.Tensor] = {}
        if method in ("lora", "full"):
            x, y = pad_rows([examples[i] for i in idx] + base_rows)
            weight = torch.tensor([weights[i] for i in idx] + [1.0] * n_base)
            loss = (sequence_losses(engine(x).logits, y) * weight).sum() / weight.sum()
        elif method in ("dpo", "kto"):
            firsts = [examples[i][0] for i in idx]
            seconds = [examples[i][1] for i in idx] if method == "dpo" else []
            x, y = pad_rows(firsts + seconds + base_rows)
            logits = engine(x).logits
            n, m = len(firsts), len(firsts) + len(seconds)
            logps = sequence_logps(logits[:m], y[:m])
            refs = [torch.tensor([ref[i][k] for i in idx]) for k in (0, 1)]
            if method == "dpo":
                pref, chosen, rejected = dpo_loss(logps[:n], logps[n:], refs[0], refs[1], on.beta)
                figures["kl"] = torch.zeros(())
            else:
                with torch.no_grad():  # the KL baseline is not differentiated (KTO; TRL's trainer alike)
                    kx, ky = pad_rows([examples[i][1] for i in idx])
                    engine.eval()  # its tokens are not routed for training: the routers do not count them
                    policy_kl = sequence_logps(engine(kx).logits, ky)
                    engine.train()
                good = torch.tensor([bool(examples[i][2]) for i in idx])
                pref, rewards, figures["kl"] = kto_loss(logps, refs[0], policy_kl, refs[1], good, on.beta,
                                                        desirable_w, undesirable_w)
                chosen, rejected = rewards[good], rewards[~good]
            lm = sequence_losses(logits[m:], y[m:]).sum() if n_base else torch.zeros(())
            loss = (pref.sum() + lm) / (n + n_base)
            figures.update(preference_loss=pref.mean().detach(), reward_chosen=_mean(chosen),
                           reward_rejected=_mean(rejected))
        else:  # grpo
            if step % on.iterations == 0:  # a new rollout, from the weights as they are now
                roll = rollout(engine, frozen, reward_model, [examples[i] for i in idx], cfg, lora,
                               seed=int(np.random.default_rng((cfg.run.seed, config["update"], step, rank))
                                        .integers(2**31)))
            with replayed_routes(roll["routes"]):
                logps = token_logps(engine(roll["x"]).logits, roll["y"])
            pref, stats = grpo_loss(logps, roll["old"], roll["ref"], roll["advantages"], roll["y"] != IGNORE,
                                    on.clip, on.kl_coef)
            lm = torch.zeros(())
            if n_base:
                bx, by = pad_rows(base_rows)
                lm = sequence_losses(engine(bx).logits, by).sum()
            groups = len(idx) * on.group_size
            loss = (pref * groups + lm) / (groups + n_base)
            figures.update(preference_loss=pref.detach(), reward=roll["reward"], **stats)
        engine.backward(loss)
        engine.step()
        update_expert_bias(engine.module)
        reduced = torch.stack([loss.detach().float().reshape(()), *(v.float().reshape(()) for v in figures.values())])
        dist.all_reduce(reduced)
        reduced = (reduced / world).tolist()
        losses.append(reduced[0])
        for key, value in zip(figures, reduced[1:]):
            curves.setdefault(key, []).append(value)
        if rank == world - 1 and step + 1 == max(1, on.steps // 2):
            kill_once()  # no-op unless a kill test armed it
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            model = engine.module
            if lora:
                merge_lora(model)
            save_checkpoint(Path(tmp) / "model", model, {**base.config, "online": on.model_dump()},
                            step=base.manifest.get("step", 0), tokens=base.manifest.get("tokens", 0))
        dist.barrier()
        metrics = {"losses": losses, "loss_first": losses[0], "loss_last": losses[-1], "precision": describe(dtype),
                   "feedback_per_batch": n_fb * world, "base_per_batch": n_base * world, "ranks": world}
        if curves:
            metrics["curves"] = curves
        if method == "kto":
            metrics["kto_weights"] = {"desirable": desirable_w, "undesirable": undesirable_w}
        return place.report(metrics, tmp)


def _mean(t: torch.Tensor) -> torch.Tensor:
    """The mean, NaN for no values (a batch without an answer of that kind)."""
    return t.float().mean() if t.numel() else torch.tensor(float("nan"))


@torch.no_grad()
def reference_logps(engine, examples: list, used: list[int], batch: int) -> dict[int, tuple[float, float]]:
    """The reference's log-probabilities of each used preference example's two rows (DPO: chosen and
    rejected; KTO: the answer and the mismatched one), in batches of `batch` rows, before any step:
    the model is still the one loaded."""
    rows = [(i, k) for i in used for k in (0, 1)]
    out: dict[int, list[float]] = {i: [0.0, 0.0] for i in used}
    engine.eval()  # the routers count no tokens for these forwards; the logits are as in training mode
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        x, y = pad_rows([examples[i][k] for i, k in chunk])
        for (i, k), lp in zip(chunk, sequence_logps(engine(x).logits, y).tolist()):
            out[i][k] = lp
    engine.train()
    return {i: (a, b) for i, (a, b) in out.items()}


@torch.no_grad()
def sample(model, prompts: list, cfg: Config, copies: int, temperature: float, seed: int) -> list[tuple]:
    """`copies` answers to each (prompt ids, stop id) from deepkiln's engine, in prompt order:
    (prompt ids, answer ids with the stop token when it stopped, stopped)."""
    from deepkiln.engine import Engine, SamplingParams

    on = cfg.online
    longest = max(len(ids) for ids, _ in prompts) + on.max_new_tokens + 1
    rows, max_len = min(len(prompts) * copies, 64), min(longest, cfg.model.max_seq_len)
    sampler = Engine(model, max_batch=rows, max_len=max_len, max_step_tokens=rows * max_len)
    params = SamplingParams(max_tokens=on.max_new_tokens, temperature=temperature)
    reqs = [(sampler.add(ids, replace(params, stop_token_ids=(stop,), seed=seed + k)), stop)
            for k, (ids, stop) in enumerate(p for p in prompts for _ in range(copies))]
    while sampler.waiting or sampler.running:
        sampler.step()
    return [(r.prompt, [*r.output, stop] if r.finish_reason == "stop" else r.output, r.finish_reason == "stop")
            for r, stop in reqs]


@torch.no_grad()
def score(answers: list[tuple], cfg: Config, reward_model) -> torch.Tensor:
    """The rewards (N,) of sampled (prompt, answer, stopped): online.rule_rewards, plus the reward
    model's score of prompt + answer when there is one."""
    on = cfg.online
    rewards = rule_rewards(on.rule_rewards, [a[:len(a) - s] for _, a, s in answers], [s for _, _, s in answers],
                           on.max_new_tokens)
    if reward_model is not None:
        rewards = rewards + reward_model(*reward_inputs([p + a for p, a, _ in answers])).float()
    return rewards


def sampled_reward(model, prompts: list, cfg: Config, reward_model) -> float:
    """The mean reward of the model's greedy answers to `prompts` (the gate's figure for GRPO)."""
    return score(sample(model, prompts, cfg, 1, 0.0, cfg.run.seed), cfg, reward_model).mean().item()


@torch.no_grad()
def rollout(engine, reference, reward_model, prompts: list, cfg: Config, lora: bool, seed: int) -> dict:
    """online.group_size answers to each (prompt ids, stop id), sampled with deepkiln's engine from the
    current weights (LoRA merged into a copy), and what GRPO's steps on them need: the rows (x, y:
    loss on the answers and their stop), the group-normalised advantages of their rewards, the
    per-token log-probabilities of the policy that sampled them (`old`) and of the reference, and
    the expert ids its routers chose for them (to replay)."""
    from deepkiln.lora import merge_lora

    on = cfg.online
    policy = copy.deepcopy(engine.module)
    if lora:
        merge_lora(policy)
    answers = sample(policy, prompts, cfg, on.group_size, on.temperature, seed)
    del policy
    rewards = score(answers, cfg, reward_model)
    x, y = pad_rows([(p + a, [IGNORE] * len(p) + a) for p, a, _ in answers])
    engine.eval()  # the routers count no tokens for this forward; the logits are as in training mode
    with recorded_routes(engine.module) as routes:
        old = token_logps(engine(x).logits, y)
    engine.train()
    return {"x": x, "y": y, "old": old, "ref": token_logps(reference(x).logits, y), "routes": dict(routes),
            "advantages": group_advantages(rewards, on.group_size), "reward": rewards.mean()}
