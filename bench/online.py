"""Feedback to serving: the seconds from the newest feedback of a burst to Serve answering with the
version trained on it, on the tiny model, and where they go (training on a DeepSpeed rank, the gate,
quantizing, the replica switch). One JSON object.

    python -m bench.online                     # about 2 minutes here
    python -m bench.online --feedback 32 --set online.steps=60

The model is the tiny preset trained for a few seconds on made-up English (tests/serving_run.py),
served by one replica over 127.0.0.1. A burst of completions is corrected through POST /v1/feedback,
then one `pipelines.online --once` trains, gates and publishes. The target on this machine is under
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
    from pipelines import online, quantize
    from serve.app import build
    from deepkiln.paths import version_of
    from deepkiln.testing import free_port, make_run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--feedback", type=int, default=12, help="corrected completions in the burst")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="config overrides")
    opts = p.parse_args(argv)
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
            for i in range(opts.feedback):
                body = {"model": cfg.serve.model_name, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 8}
                completion = requests.post(f"{url}/v1/completions", json=body, timeout=60).json()
                requests.post(f"{url}/v1/feedback", json={"feedback_id": f"bench-{i}", "completion_id": completion["id"],
                                                          "rating": 1, "correction": ANSWERS[i % len(ANSWERS)]},
                              timeout=60).raise_for_status()
            last_feedback = time.time()
            report = online.main(argv + ["--once"])
            state = json.loads((Path(tmp) / "served" / "online" / "state.json").read_text())
            served = requests.post(f"{url}/v1/completions", json={"model": cfg.serve.model_name, "prompt": "The river",
                                                                  "max_tokens": 4}, timeout=60).json()
            new = state["versions"][report["version"]]
            result = {
                "feedback": report["feedback"]["examples"], "steps": report["steps"], "method": report["method"],
                "published": report["published"], "gate_passed": report["gate"]["passed"],
                "dtype": report["precision"]["update"]["dtype"], "cpu_capability": report["precision"]["update"]["cpu_capability"],
                "precision": report["precision"],
                "serving_new_version": served["system_fingerprint"] == (version_of(new["artifact"]) if new["artifact"] else None),
                "feedback_to_serving_s": report["feedback_to_serving_s"],
                "measured_here_s": round(time.time() - last_feedback, 1),  # includes the poll and this check
                "target_s": TARGET_S, "update_s": report["seconds"], **report["timings"],
                "loss_first": round(report["loss_first"], 4), "loss_last": round(report["loss_last"], 4),
                "perplexity_before": round(report["gate"]["current"]["perplexity"], 3),
                "perplexity_after": round(report["gate"]["candidate"]["perplexity"], 3),
                "feedback_target_loss_before": round(report["gate"]["current"]["feedback_target_loss"], 3),
                "feedback_target_loss_after": round(report["gate"]["candidate"]["feedback_target_loss"], 3),
            }
        finally:
            serve.shutdown()
            if started:
                ray.shutdown()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
