"""The Serve application: OpenAIIngress (HTTP, text) in front of LLMServer replicas (token ids).

    serve run serve/config.yaml                           # local; Ctrl-C stops it
    ray job submit --working-dir . -- serve run serve/config.yaml --non-blocking
    python -m serve.app --config configs/tiny.yaml        # the same, from a deepkiln config

`build_app(args)` is the import path Serve configs name (serve.app:build_app). Its args:
`config` (a preset YAML) and `overrides` (a list of dotted `--a.b=v` options). The artifact is
<run_dir>/<run.name>/quantize/<quant.format> unless serve.artifact names another; pipelines.online
publishes a new version by redeploying the app from the running app's own settings
(OpenAIIngress.settings) with another artifact.
"""

from __future__ import annotations

import os
import sys
import time

from ray import serve

from deepkiln.config import Config, load_config
from deepkiln.paths import absolute
from serve.api import OpenAIIngressDeployment, check_exposure, configured_api_keys, key_digests
from serve.llm import LLMServerDeployment


def llm_options(cfg: Config) -> dict:
    s = cfg.serve
    return {"num_replicas": s.replicas, "ray_actor_options": {"num_cpus": s.replica_cpus},
            # A replica's own queue (serve.max_queue choices) answers 503 when full; in front of the
            # replicas, Serve's queue is bounded too (503 in the ingress), so nothing waits unbounded.
            "max_ongoing_requests": s.max_batch + s.max_queue + 1, "max_queued_requests": s.max_queue}


def start_options(cfg: Config) -> dict:
    """serve.start's keyword arguments: the HTTP options and the controller's and proxy's log level."""
    return {"http_options": http_options(cfg), "logging_config": {"log_level": cfg.serve.log_level}}


def http_options(cfg: Config) -> dict:
    """serve.start's HTTP options: the address, and a request timeout a little past the app's own
    (serve.request_timeout_s answers 408 first; this one ends a connection nothing answers)."""
    return {"host": cfg.serve.host, "port": cfg.serve.port, "request_timeout_s": cfg.serve.request_timeout_s + 10}


def build(cfg: Config, artifact: str | None = None, api_key_sha256: list[str] | None = None):
    """The app serving `artifact` (default: the config's). Redeployed with another artifact, Serve
    replaces the LLMServer replicas one by one, each loading the new version (no request dropped).
    The API keys are read here, where the app is deployed, failing closed (a configured key file that
    is missing, unreadable or empty, or a non-loopback serve.host without a key, is a ValueError),
    and reach every ingress replica as their SHA-256 in the deployment's arguments: the keys
    themselves never leave this process. `api_key_sha256` (a running app's, when republishing) is
    used as it is instead."""
    cfg = absolute(cfg)  # replicas run in folders of their own
    if api_key_sha256 is None:
        api_key_sha256 = key_digests(configured_api_keys(cfg))
    check_exposure(cfg, api_key_sha256)
    if artifact:  # a restarted replica loads it again: it is in the deployments' arguments
        cfg.serve.artifact = artifact if "://" in artifact else os.path.abspath(artifact)
    llm = LLMServerDeployment.options(**llm_options(cfg),
                                      logging_config={"log_level": cfg.serve.log_level}).bind(cfg.to_dict())
    # The proxy's queue in front of the ingress is bounded as well (503 beyond it).
    ingress = OpenAIIngressDeployment.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
                                              max_queued_requests=1000,
                                              logging_config={"log_level": cfg.serve.log_level}).bind(
                                                  llm, cfg.to_dict(), api_key_sha256)
    return ingress


def build_app(args: dict):
    argv = ["--config", args["config"]] if args.get("config") else []
    return build(load_config(argv + list(args.get("overrides", []))))


def main(argv=None) -> None:
    from deepkiln.ray_utils import init_ray

    cfg = load_config(sys.argv[1:] if argv is None else argv)
    init_ray()
    serve.start(**start_options(cfg))
    serve.run(build(cfg), name="deepkiln", route_prefix="/")
    print(f"serve: http://{cfg.serve.host}:{cfg.serve.port}/v1 (model {cfg.serve.model_name!r}); Ctrl-C stops it",
          flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
