"""Tune: Ray Tune with ASHA over short pipelines.train runs (lr, warmup, batch, MoE bias rate).

    python -m pipelines.tune --config configs/tiny.yaml [--tune.num_samples=8 --tune.max_steps=100]
    ray job submit --working-dir . -- python -m pipelines.tune --config configs/small.yaml

Each trial is a function under a unique run name: with train.num_workers=1 it runs the training
loop in its own process (a gloo group of one; no worker group to start), else it builds its own
TorchTrainer (the Ray Train V2 pattern) with TuneReportCallback. ASHA stops weak trials at their
validation-loss reports. Trials run as many at once as the cluster's CPUs hold. A trial that fails
(its process killed, or its trainer out of train.max_failures) is retried up to tune.max_failures
times and continues from its own last complete checkpoint in its storage. Writes
<run_dir>/<run.name>/tune/: results.csv, best.yaml (the given config with the best hyperparameters:
`python -m pipelines.train --config .../best.yaml`), trials.png, tune_summary.json, and each trial's
training output under trials/<trial id>/.

Stopped trials' workers are freed by Ray Train's placement-group cleaner, which needs Ray's state API
(the dashboard): clusters and local runs (deepkiln.ray_utils.init_ray) have one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from deepkiln.config import Config, load_config
from deepkiln.paths import RunPaths, absolute

# Dotted config keys searched, with how Tune samples them.
SEARCH = {
    "train.lr": ("loguniform", 1e-3, 3e-2),
    "train.warmup_steps": ("choice", [5, 10, 20]),
    "train.batch_size": ("choice", [8, 16]),
    "model.bias_update_rate": ("loguniform", 1e-4, 1e-2),
}


TRIAL_CPUS = 0.01  # the trial function only waits on its own trainer (Tune refuses 0)


def with_overrides(base: Config, params: dict) -> Config:
    data = base.to_dict()
    for key, value in params.items():
        section, field = key.split(".")
        data[section][field] = value
    return Config.from_dict(data)


def trial(config: dict) -> None:
    """One Tune trial: a short training run with this trial's hyperparameters. A trial of one
    worker trains in its own process; more workers are a Ray Train worker group of its own."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from deepkiln.trainer import make_trainer, train_in_process

    cfg = with_overrides(Config.from_dict(config["base"]), {k: config[k] for k in SEARCH})
    cfg.run.run_dir = f"{RunPaths.of(cfg).stage('tune')}/trials"
    cfg.run.name = tune.get_context().get_trial_id()
    cfg.train.resume = True  # a retried trial continues from its own checkpoints
    if cfg.train.num_workers == 1:
        train_in_process(cfg)
    else:
        make_trainer(cfg, callbacks=[TuneReportCallback()]).fit()


def plot_trials(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        df = r.metrics_dataframe
        if df is not None and "val_loss" in df:
            ax.plot(df["step"], df["val_loss"], marker="o", label=f"lr={r.config['train.lr']:.1e}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from deepkiln.ray_utils import init_ray, uses_gpu
    from deepkiln.trainer import check_inputs

    cfg = absolute(load_config(sys.argv[1:] if argv is None else argv))
    tu, t = cfg.tune, cfg.train
    base = cfg.model_copy(deep=True)
    base.train.tokens = RunPaths.of(cfg).tokens  # trials run under <tune>/trials/<id>: keep the run's shards
    base.train.steps = tu.max_steps
    base.train.checkpoint_every = base.train.eval_every = max(1, tu.max_steps // tu.reports)
    for size in SEARCH["train.batch_size"][1]:  # every sampled batch must split over the workers
        check_inputs(with_overrides(base, {"train.batch_size": size}), t.num_workers)
    init_ray()
    out = Path(RunPaths.of(cfg).stage("tune"))
    out.mkdir(parents=True, exist_ok=True)
    samplers = {"loguniform": tune.loguniform, "choice": tune.choice}
    space = {k: samplers[kind](*args) for k, (kind, *args) in SEARCH.items()}
    own = t.cpus_per_worker if t.num_workers == 1 else TRIAL_CPUS  # a one-worker trial trains itself
    per_trial = own + (t.num_workers * t.cpus_per_worker if t.num_workers > 1 else 0)
    concurrent = max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))
    # ...on a GPU where the cluster has them, as its worker would (Ray Train reserves a worker's own).
    reserve = {"CPU": own} | ({"GPU": 1} if t.num_workers == 1 and uses_gpu() else {})
    tuner = tune.Tuner(
        tune.with_resources(trial, reserve),
        param_space={"base": base.to_dict(), **space},
        tune_config=tune.TuneConfig(
            metric="val_loss", mode="min", num_samples=tu.num_samples, max_concurrent_trials=concurrent,
            reuse_actors=False,  # a fresh process per trial: each owns a whole Train run
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=tu.reports, grace_period=tu.grace_period,
                                    reduction_factor=2)),
        run_config=tune.RunConfig(name=cfg.run.name, storage_path=str(out / "ray"),
                                  failure_config=tune.FailureConfig(max_failures=tu.max_failures)))
    results = tuner.fit()
    table = results.get_dataframe()
    table = table.drop(columns=[c for c in table.columns if c.startswith("config/base/")])
    table.to_csv(out / "results.csv", index=False)
    best = results.get_best_result()
    best_cfg = with_overrides(cfg, {k: best.config[k] for k in SEARCH})
    (out / "best.yaml").write_text(yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
    plot_trials(results, out / "trials.png")
    summary = {"trials": len(table), "errors": len(results.errors), "best": {k: best.config[k] for k in SEARCH},
               "best_val_loss": best.metrics["val_loss"], "best_trial": best.metrics["trial_id"],
               "results": str(out / "results.csv"), "best_config": str(out / "best.yaml")}
    (out / "tune_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"tune: {summary['trials']} trials, best val loss {summary['best_val_loss']:.3f} with "
          f"{summary['best']} -> {out / 'best.yaml'}", flush=True)
    return summary


if __name__ == "__main__":
    main()
