"""Feedback to serving, for each online.method: the seconds from the newest feedback of a burst to
Serve answering with the version trained on it, on the tiny model, and where they go (training on a
DeepSpeed rank, the gate, quantizing, the replica switch). One JSON object.

    python -m bench.online                     # lora, dpo, kto and grpo in turn: about 5 minutes here
    python -m bench.online --methods dpo --feedback 32 --set online.steps=60

The model is the tiny preset trained for a few seconds on made-up English (deepkiln.testing.make_run),
served by one replica over 127.0.0.1. For each method in turn, a burst of completions is corrected
through POST /v1/feedback (a correction gives a supervised example, a pair and two labelled answers),
then one `pipelines.online --once --online.method=METHOD` trains the first version (v0000, served
again by a rollback before each method but the first), gates and publishes (GRPO with the
rule reward `short` unless --set names online.rule_rewards). The target on this machine is under
120 s from the newest feedback to serving.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import requests

TARGET_S = 120
PROMPTS = ["The river", "A market", "The doctor wrote", "Summer in the village", "The bridge", "A garden"]
ANSWERS = ["runs past the old mill.", "opens at dawn.", "a letter to the school.", "is long and warm.",
           "is made of stone.", "needs rain."]


def main(argv=None) -> dict:
    import ray
    from ray import serve

    from deepkiln.config import load_config
    from deepkiln.testing import free_port, make_run
    from pipelines import online, quantize
    from serve.app import build

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--feedback", type=int, default=12, help="corrected completions in each burst")
    p.add_argument("--methods", nargs="+", default=["lora", "dpo", "kto", "grpo"], choices=sorted(online.KIND))
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="config overrides")
    opts = p.parse_args(argv)
    result = {"feedback": opts.feedback, "target_s": TARGET_S, "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        argv = make_run(Path(tmp))
        quantize.main(argv)
        argv += ["--quant.format=nf4", f"--online.min_feedback={opts.feedback}", *(f"--{o}" for o in opts.set)]
        cfg = load_config(argv)
        started = not ray.is_initialized()
        if started:
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        try:
            serve.run(build(cfg), name=online.APP, route_prefix="/")
            for i, method in enumerate(opts.methods):
                if i:  # every method updates the same first version (its feedback includes the earlier bursts)
                    online.main([*argv, "--rollback", "v0000"])
                result["methods"][method] = burst_then_update(argv, cfg, url, method, opts.feedback)
        finally:
            serve.shutdown()
            if started:
                ray.shutdown()
    print(json.dumps(result))
    return result


def burst_then_update(argv: list[str], cfg, url: str, method: str, feedback: int) -> dict:
    """A burst of corrected completions, then one online update with `method`: its figures."""
    from deepkiln.paths import RunPaths, version_of
    from pipelines import online

    for i in range(feedback):
        body = {"model": cfg.serve.model_name, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 8}
        completion = requests.post(f"{url}/v1/completions", json=body, timeout=60).json()
        requests.post(f"{url}/v1/feedback", json={"feedback_id": f"bench-{method}-{i}",
                                                  "completion_id": completion["id"], "rating": 1,
                                                  "correction": ANSWERS[i % len(ANSWERS)]},
                      timeout=60).raise_for_status()
    last_feedback = time.time()
    # GRPO needs a reward: the rule preferring short answers unless --set names one (no reward model here).
    extra = ["--online.rule_rewards=[short]"] if method == "grpo" and not cfg.online.rule_rewards else []
    report = online.main([*argv, "--once", f"--online.method={method}", *extra])
    state = json.loads(Path(RunPaths.of(cfg).online_state).read_text())
    served = requests.post(f"{url}/v1/completions", json={"model": cfg.serve.model_name, "prompt": "The river",
                                                          "max_tokens": 4}, timeout=60).json()
    new = state["versions"][report["version"]]
    new_fingerprint = version_of(new["artifact"]) if new["artifact"] else None
    gate = report["gate"]
    figures = {
        "examples": report["feedback"]["examples"], "kind": report["feedback"]["kind"], "steps": report["steps"],
        "published": report["published"], "gate_passed": gate["passed"], "reasons": gate["reasons"],
        "dtype": report["precision"]["update"]["dtype"],
        "cpu_capability": report["precision"]["update"]["cpu_capability"],
        "serving_new_version": served["system_fingerprint"] == new_fingerprint,
        "feedback_to_serving_s": report["feedback_to_serving_s"],
        "measured_here_s": round(time.time() - last_feedback, 1),  # includes the poll and this check
        "update_s": report["seconds"], **report["timings"],
        "loss_first": round(report["loss_first"], 4), "loss_last": round(report["loss_last"], 4),
        "perplexity_before": round(gate["current"]["perplexity"], 3),
        "perplexity_after": round(gate["candidate"]["perplexity"], 3),
        "feedback_target_loss_before": round(gate["current"]["feedback_target_loss"], 3),
        "feedback_target_loss_after": round(gate["candidate"]["feedback_target_loss"], 3),
    }
    curves = report.get("curves", {})
    if "margin" in curves:  # dpo, kto
        figures["margin_last"] = next((round(m, 4) for m in reversed(curves["margin"]) if m is not None), None)
        figures["disfavoured_loss_before"] = round(gate["current"]["disfavoured_loss"], 3)
        figures["disfavoured_loss_after"] = round(gate["candidate"]["disfavoured_loss"], 3)
    if "sampled_reward" in gate["current"]:  # grpo
        figures["rollout_reward_first"], figures["rollout_reward_last"] = curves["reward"][0], curves["reward"][-1]
        figures["sampled_reward_before"] = round(gate["current"]["sampled_reward"], 4)
        figures["sampled_reward_after"] = round(gate["candidate"]["sampled_reward"], 4)
    return figures


if __name__ == "__main__":
    main()
