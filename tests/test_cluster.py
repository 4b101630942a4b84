"""cluster.yaml: valid for Ray's own cluster launcher, and the security items hold: token auth on
every node with the token from outside the repository, the dashboard bound to 127.0.0.1, the project
installed on every node type, autoscaling bounds, a pinned image, and a shared run_dir for the stages."""

import re
import subprocess
from pathlib import Path

import yaml

from deepkiln.config import load_config

REPO = Path(__file__).resolve().parents[1]


def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_ray_launcher_schema_accepts_it():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster()))  # what `ray up` runs first; raises on any error


def test_token_auth_on_every_node_with_the_token_kept_out_of_git():
    c = cluster()
    starts = c["head_start_ray_commands"] + c["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in starts if cmd.strip().split()[-1] != "stop")
    assert "--env RAY_AUTH_MODE=token" in c["docker"]["run_options"]  # drivers and jobs in the container too
    [(dest, src)] = [(d, s) for d, s in c["file_mounts"].items() if "auth_token" in d]
    assert src.startswith("~/") and not (REPO / src[2:]).exists()   # from the laptop, not the repository
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout
    assert "auth_token" not in tracked


def test_the_dashboard_and_jobs_api_are_not_open_to_the_world():
    c = cluster()
    head = " ".join(c["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in yaml.safe_dump(c)
    assert "security_group" not in c["provider"]  # the launcher's own group: SSH in, nothing else
    assert "-p " not in " ".join(c["docker"]["run_options"])  # no container port published


def test_node_types_bounds_image_install_and_storage():
    c = cluster()
    types = c["available_node_types"]
    assert c["head_node_type"] == "head" and {"cpu_worker", "gpu_worker"} <= set(types)
    assert types["gpu_worker"]["resources"]["GPU"] >= 1 and "GPU" not in types["cpu_worker"]["resources"]
    assert all(0 <= t.get("min_workers", 0) <= t.get("max_workers", 0) <= c["max_workers"]
               for name, t in types.items() if name != "head")
    images = [c["docker"]["image"], types["gpu_worker"]["docker"]["worker_image"]]
    import ray
    assert all(img.startswith(f"rayproject/ray:{ray.__version__}-py311") for img in images)  # pinned, current
    installs = c["head_setup_commands"] + c["worker_setup_commands"] + types["gpu_worker"]["worker_setup_commands"]
    assert all(re.search(r"pip install -q -e '?/home/ray/deepkiln", cmd) for cmd in installs)
    assert "deepkiln[vllm]" in types["gpu_worker"]["worker_setup_commands"][0]  # serve/vllm.yaml's engine
    assert c["file_mounts"]["/home/ray/deepkiln"] == "."
    small = load_config(["--config", str(REPO / "configs/small.yaml")])
    mount = small.run.run_dir.split("/runs")[0]
    assert mount in " ".join(c["initialization_commands"]) and f"-v {mount}:{mount}" in c["docker"]["run_options"]


def test_the_vllm_serve_config_serves_an_exported_folder_on_the_gpu_workers():
    """serve/vllm.yaml: Ray Serve LLM's OpenAI app over a folder `pipelines.export --format hf` writes,
    on the shared file system, scheduled on cluster.yaml's GPU worker type, installed by its extra.
    (vLLM needs a GPU: the config is checked here, the serving itself only on a GPU cluster.)"""
    import tomllib

    app = yaml.safe_load((REPO / "serve/vllm.yaml").read_text())["applications"][0]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    llm = app["args"]["llm_configs"][0]
    small = load_config(["--config", str(REPO / "configs/small.yaml")])
    mount = small.run.run_dir.split("/runs")[0]
    assert llm["model_loading_config"]["model_source"].startswith(mount + "/")
    assert llm["engine_kwargs"]["max_model_len"] == small.model.max_seq_len
    gpu = cluster()["available_node_types"]["gpu_worker"]
    assert gpu["node_config"]["InstanceType"].startswith("g5.") and llm["accelerator_type"] == "A10G"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    import ray
    assert extras["vllm"] == [f"ray[llm]=={ray.__version__}"]
