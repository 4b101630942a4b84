"""The Serve application: OpenAIIngress (HTTP, text) in front of LLMServer replicas (token ids).

    serve run serve/config.yaml                           # local; Ctrl-C stops it
    ray job submit --working-dir . -- serve run serve/config.yaml --non-blocking
    python -m serve.app --config configs/tiny.yaml        # the same, from a deepkiln config

`build_app(args)` is the import path Serve configs name (serve.app:build_app). Its args:
`config` (a preset YAML) and `overrides` (a list of dotted `--a.b=v` options). The artifact is
<run_dir>/<run.name>/quantize/<quant.format> unless serve.artifact names another; a new version is
published by changing the LLMServer deployment's user_config {"artifact": path}.
"""

from __future__ import annotations

import os
import sys
import time

from ray import serve

from deepkiln.config import Config, load_config
from deepkiln.paths import RunPaths, absolute
from serve.api import OpenAIIngressDeployment
from serve.llm import LLMServerDeployment


def llm_options(cfg: Config, artifact: str | None = None) -> dict:
    s = cfg.serve
    return {"num_replicas": s.replicas, "ray_actor_options": {"num_cpus": s.replica_cpus},
            # Serve never queues in front of a replica: LLMServer's own queue answers 503 when full.
            "max_ongoing_requests": s.max_batch + s.max_queue + 1,
            "user_config": {"artifact": artifact or RunPaths.of(cfg).artifact}}


def build(cfg: Config, artifact: str | None = None):
    """The app serving `artifact` (default: the config's). Redeployed with another artifact, Serve
    replaces the LLMServer replicas one by one, each loading the new version (no request dropped)."""
    cfg = absolute(cfg)  # replicas run in folders of their own
    served = cfg.model_copy(deep=True)
    if artifact:  # a new replica loads it in __init__, and reconfigure then finds it loaded
        served.serve.artifact = artifact if "://" in artifact else os.path.abspath(artifact)
    llm = LLMServerDeployment.options(**llm_options(cfg, artifact)).bind(served.to_dict())
    ingress = OpenAIIngressDeployment.options(ray_actor_options={"num_cpus": 0},
                                              max_ongoing_requests=1000).bind(llm, cfg.to_dict())
    return ingress


def build_app(args: dict):
    argv = ["--config", args["config"]] if args.get("config") else []
    return build(load_config(argv + list(args.get("overrides", []))))


def main(argv=None) -> None:
    from deepkiln.ray_utils import init_ray

    cfg = load_config(sys.argv[1:] if argv is None else argv)
    init_ray()
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build(cfg), name="deepkiln", route_prefix="/")
    print(f"serve: http://{cfg.serve.host}:{cfg.serve.port}/v1 (model {cfg.serve.model_name!r}); Ctrl-C stops it",
          flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
