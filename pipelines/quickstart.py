"""Quickstart: every stage in order on local Ray and the built-in corpus, ending in a live endpoint.

    python -m pipelines.quickstart --config configs/tiny.yaml                   # what `make run` runs
    python -m pipelines.quickstart --config configs/tiny.yaml --keep-serving    # leave the endpoint up (Ctrl-C)
    python -m pipelines.quickstart --config configs/tiny.yaml --redo train      # that stage and the ones after it
    python -m pipelines.quickstart --config configs/tiny.yaml --fresh --privacy.enabled=true

Stages: prepare (curation) -> tokenizer -> train (Ray Train + DeepSpeed) -> [dp_finetune, with
privacy.enabled] -> audit (a failing gate stops before serving) -> quantize -> serve (Ray Serve on
serve.host:serve.port) -> feedback (simulated users correct a few answers with held-out text) ->
online (one update, gated and published). A stage whose output is already there is reused; a stage
killed half-way left no output behind (each writes it last, atomically), so running again finishes
the job. The end is a summary table: time per stage, data kept, losses, perplexity per format,
epsilon when DP ran, the audit's verdict, the endpoint with a sample completion in each of the
built-in corpus's languages (English and Chinese), and the curl and openai commands to try it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import requests

from deepkiln.config import Config, load_config
from deepkiln.paths import RunPaths
from deepkiln.text import language_mix, unit_ends

STAGES = ["prepare", "tokenizer", "train", "dp_finetune", "audit", "quantize", "serve", "feedback", "online"]
APP = "deepkiln"


def done_marker(cfg: Config, stage: str) -> Path | None:
    """The file a finished stage leaves (written last); None for stages that always run. The
    feedback round is for the update: both are done once an update ran."""
    return RunPaths.of(cfg).done("online" if stage == "feedback" else stage)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# -- the stages that are not plain pipelines ----------------------------------------------------------

def serve_app(cfg: Config) -> str:
    from ray import serve

    from serve.app import build, start_options

    serve.start(**start_options(cfg))
    serve.run(build(cfg), name=APP, route_prefix="/")
    return f"http://{cfg.serve.host}:{cfg.serve.port}"


def complete(url: str, cfg: Config, prompt: str, max_tokens: int = 24, **kw) -> dict:
    body = {"model": cfg.serve.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw}
    r = requests.post(f"{url}/v1/completions", json=body, timeout=120)
    r.raise_for_status()
    return r.json()


def feedback_round(cfg: Config, url: str) -> dict:
    """Simulated users: ask for the start of held-out documents and correct each answer with the
    document's real continuation."""
    shards = sorted(Path(RunPaths.of(cfg).shards).glob("*.parquet"))
    texts = [t for t in pq.read_table(shards[-1], columns=["text"]).column("text").to_pylist()[::-1]
             if len(unit_ends(t)) >= 20][:cfg.online.min_feedback]
    if len(texts) < cfg.online.min_feedback:
        raise ValueError(f"the prepared shards hold {len(texts)} documents of 20+ words; "
                         f"online.min_feedback={cfg.online.min_feedback} are needed for the feedback round")
    for i, text in enumerate(texts):
        # six words to start from and the next twelve as the correction (a CJK character is a word)
        ends = unit_ends(text)
        answer = complete(url, cfg, " ".join(text[:ends[5]].split()), max_tokens=12)
        r = requests.post(f"{url}/v1/feedback", timeout=60, json={
            "feedback_id": f"quickstart-{int(time.time())}-{i}", "completion_id": answer["id"], "rating": 1,
            "correction": " ".join(text[ends[5]:ends[17]].split())})
        r.raise_for_status()
    return {"feedback": len(texts)}


# -- the run ------------------------------------------------------------------------------------------

def run_stage(stage: str, cfg: Config, argv: list[str], url: str | None) -> dict:
    from pipelines import audit, online, prepare, quantize, tokenizer, train

    if stage == "prepare":
        return prepare.main(argv)
    if stage == "tokenizer":
        return tokenizer.main(argv)
    if stage == "train":
        return train.main(argv)
    if stage == "dp_finetune":
        from pipelines import dp_finetune

        return dp_finetune.main(argv)
    if stage == "audit":  # audit, quantize and online start from RunPaths.final_model: the DP model when DP ran
        return audit.main(argv)
    if stage == "quantize":
        return quantize.main(argv)
    if stage == "feedback":
        return feedback_round(cfg, url)
    if stage == "online":
        return online.main(argv + ["--once"])
    raise AssertionError(stage)


SAMPLES = {"sample": "The for statement", "sample (zh)": "床前明月光，"}
"""What the summary asks the served model: the built-in corpus's two languages (Python's docs, classical Chinese)."""


def summary_rows(cfg: Config, times: dict, url: str | None, samples: dict[str, str]) -> list[tuple[str, str]]:
    def have(stage):
        marker = done_marker(cfg, stage)
        return marker is not None and marker.is_file()

    rows = [("stage times", ", ".join(f"{s} {t:.0f}s" for s, t in times.items()))]
    if have("prepare"):
        r = read_json(done_marker(cfg, "prepare"))
        rows.append(("data kept", f"{r['docs_out']:,} of {r['docs_in']:,} documents ({r['exact_duplicates_removed']} exact "
                                  f"and {r['near_duplicates_removed']} near duplicates removed)"))
        if r.get("languages"):
            rows.append(("languages", language_mix(r["languages"], r["docs_out"])))
    if have("tokenizer"):
        r = read_json(done_marker(cfg, "tokenizer"))
        rows.append(("tokens", f"{r['total_tokens']:,} (vocabulary {r['vocab_size']:,})"))
    if have("train"):
        last = read_json(done_marker(cfg, "train"))["history"][-1]
        rows.append(("training loss", f"{last['loss']:.3f} (validation {last.get('val_loss', float('nan')):.3f}) "
                                      f"after {last['step']} steps"))
        strata = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("val_loss/")}
        if strata:  # train.mixture: each stratum's own validation loss
            rows.append(("validation by " + cfg.train.mixture_by,
                         ", ".join(f"{s} {v:.3f} ({cfg.train.mixture[s] / sum(cfg.train.mixture.values()):.0%} "
                                   f"of training)" for s, v in strata.items())))
        p = read_json(done_marker(cfg, "train")).get("precision") or {}
        if p:
            rows.append(("compute", f"{p['dtype']} (CPU capability {p['cpu_capability']}, "
                                    f"{'native' if p['bf16_native'] else 'no native'} bf16)"))
    if cfg.privacy.enabled and have("dp_finetune"):
        r = read_json(done_marker(cfg, "dp_finetune"))
        rows.append(("privacy", f"epsilon {r.get('epsilon')} at delta {r.get('delta')}"))
    if have("audit"):
        r = read_json(done_marker(cfg, "audit"))
        rows.append(("audit", "passed" if r["passed"] else "FAILED: " + "; ".join(r["reasons"])))
    if have("quantize"):
        r = read_json(done_marker(cfg, "quantize"))["formats"]
        rows.append(("perplexity", ", ".join(f"{f} {v['perplexity']:.2f} ({v['bytes_on_disk'] / 1e6:.2f} MB)"
                                             for f, v in r.items())))
    if have("online"):
        state = read_json(done_marker(cfg, "online"))
        rows.append(("online", f"{state['updates']} update(s); serving {state['current']}"))
    if url:
        rows += [("endpoint", f"{url}/v1 (model {cfg.serve.model_name!r})"),
                 *((name, " ".join(text.split())) for name, text in samples.items())]
    return rows


def print_summary(rows: list[tuple[str, str]], cfg: Config, url: str | None) -> None:
    width = max(len(k) for k, _ in rows)
    print("\n" + "=" * 100)
    for k, v in rows:
        print(f"{k:>{width}}  {v}")
    if url:
        print(f"\ntry it:\n  curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d "
              f"'{{\"model\": \"{cfg.serve.model_name}\", \"messages\": [{{\"role\": \"user\", \"content\": "
              f"\"What is a list?\"}}], \"max_tokens\": 32}}'")
        print(f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='unused'); "
              f"print(c.completions.create(model='{cfg.serve.model_name}', prompt='The for statement', "
              f"max_tokens=32).choices[0].text)\"")
    print("=" * 100, flush=True)


def main(argv=None) -> dict:
    from deepkiln.ray_utils import init_ray

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--keep-serving", action="store_true")
    p.add_argument("--fresh", action="store_true", help="run every stage again")
    p.add_argument("--redo", choices=STAGES, help="run this stage and every later one again")
    opts, argv = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    # A console a newcomer reads: Serve's INFO lines (a line per request and per replica change) off
    # unless asked for (an option given later wins).
    argv = ["--serve.log_level=WARNING", *argv]  # the stages it runs get it too (online redeploys)
    cfg = load_config(argv)
    from ray import serve  # noqa: F401  (importing Serve sets its driver logger to INFO: set it after)

    logging.getLogger("ray.serve").setLevel(cfg.serve.log_level)
    stages = [s for s in STAGES if s != "dp_finetune" or cfg.privacy.enabled]
    redo_from = 0 if opts.fresh else stages.index(opts.redo) if opts.redo else len(stages)
    init_ray()
    times, results, url = {}, {}, None
    for i, stage in enumerate(stages):
        marker = done_marker(cfg, stage)
        if marker is not None and marker.is_file() and i < redo_from:
            print(f"[{i + 1}/{len(stages)}] {stage}: done before ({marker}); reused", flush=True)
            continue
        print(f"[{i + 1}/{len(stages)}] {stage} ...", flush=True)
        start = time.perf_counter()
        if stage == "serve":
            url = serve_app(cfg)
            results[stage] = complete(url, cfg, "The for statement")
        else:
            results[stage] = run_stage(stage, cfg, argv, url)
        times[stage] = time.perf_counter() - start
        if stage == "audit" and not results[stage]["passed"]:
            raise SystemExit(f"quickstart: the audit gate failed ({'; '.join(results[stage]['reasons'])}); "
                             f"see {RunPaths.of(cfg).done('audit')}. Not serving this model.")
    samples = {name: prompt + complete(url, cfg, prompt, max_tokens=32, temperature=0.8, top_p=0.95,
                                       seed=cfg.run.seed)["choices"][0]["text"] for name, prompt in SAMPLES.items()}
    rows = summary_rows(cfg, times, url, samples)
    print_summary(rows, cfg, url)
    result = {"times": times, "url": url, "sample": samples["sample"], "sample_zh": samples["sample (zh)"],
              "summary": dict(rows), "results": results}
    if opts.keep_serving:
        print(f"serving at {url}/v1; Ctrl-C stops it", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return result


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    main()
