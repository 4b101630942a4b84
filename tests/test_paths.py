"""RunPaths: the one place that knows where a run's artifacts live."""

import ast
import json
from pathlib import Path

import pytest

from deepkiln.config import load_config
from deepkiln.paths import RunPaths, absolute

REPO = Path(__file__).resolve().parents[1]


def test_the_layout_and_the_config_fields_that_override_it(tmp_path):
    p = RunPaths.of(load_config(["--run.run_dir", str(tmp_path), "--run.name", "r"]))
    root = f"{tmp_path}/r"
    assert (p.root, p.tokens, p.tokenizer_model) == (root, f"{root}/tokenizer/tokens", f"{root}/tokenizer/tokenizer.model")
    assert p.final_model == p.train_model == p.audit_model == f"{root}/train/model"
    assert p.artifact == p.quantized("nf4") == f"{root}/quantize/nf4"
    assert p.collector_db(1) == f"{root}/feedback/collector-1.sqlite" and p.replay_db == f"{root}/online/replay.sqlite"
    assert p.done("train") == Path(root, "train/train_summary.json") and p.done("serve") is None
    moved = RunPaths.of(load_config(["--run.run_dir", str(tmp_path), "--train.tokens=/t", "--serve.tokenizer=/k.model",
                                     "--serve.artifact=/a", "--feedback.store=/f", "--quant.source=/q",
                                     "--fairness.model=/m"]))
    assert (moved.tokens, moved.tokenizer_model, moved.artifact, moved.feedback, moved.final_model, moved.audit_model) \
        == ("/t", "/k.model", "/a", "/f", "/q", "/m")


def test_with_privacy_on_the_final_model_is_the_dp_model_and_the_online_loop_starts_from_it(tmp_path):
    from pipelines import online

    argv = ["--config", str(REPO / "configs/tiny.yaml"), "--run.run_dir", str(tmp_path), "--privacy.enabled=true"]
    paths = RunPaths.of(load_config(argv))
    assert paths.final_model == paths.dp_model == f"{tmp_path}/tiny/dp_finetune/model"
    assert paths.audit_model == paths.dp_model
    for folder in (paths.train_model, paths.dp_model, paths.artifact):  # what the stages leave behind
        Path(folder).mkdir(parents=True)
        (Path(folder) / "manifest.json").write_text(json.dumps({"files": {}}))
    state = online.load_state(load_config(argv))
    assert state["versions"]["v0000"]["model"] == paths.dp_model  # not the non-private train/model
    assert state["versions"]["v0000"]["artifact"] == paths.artifact


def test_absolute_resolves_local_paths_and_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = absolute(load_config(["--run.run_dir=runs", "--train.tokens=tok", "--feedback.store=s3://b/fb"]))
    assert cfg.run.run_dir == f"{tmp_path}/runs" and cfg.train.tokens == f"{tmp_path}/tok"
    assert cfg.feedback.store == "s3://b/fb" and cfg.serve.artifact == ""  # empty stays empty: the layout's


@pytest.mark.parametrize("package", ["pipelines", "serve", "actors", "deepkiln"])
def test_no_module_imports_a_pipeline_but_the_quickstart(package):
    # A helper a second module needs moves to its home (paths, evaluate, training, ...).
    offenders = []
    for path in sorted((REPO / package).glob("*.py")):
        if path.name == "quickstart.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.name}: {n}" for n in names if n == "pipelines" or n.startswith("pipelines.")]
    assert not offenders, offenders


def test_a_stage_deletes_only_inside_its_run_folder(tmp_path):
    import os

    p = RunPaths.of(load_config(["--run.run_dir", str(tmp_path / "runs"), "--run.name", "r"]))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep").write_text("x")
    os.makedirs(p.stage("train"))
    os.symlink(tmp_path / "outside", f"{p.stage('train')}/ray")  # a link out of the run folder
    for path in (tmp_path / "outside", f"{p.root}/../outside", f"{p.stage('train')}/ray", p.root, tmp_path):
        with pytest.raises(ValueError, match="not inside the run folder"):
            p.remove(path)
    assert (tmp_path / "outside" / "keep").is_file()
    os.makedirs(f"{p.stage('online')}/versions/v0001/model")
    p.remove(f"{p.stage('online')}/versions/v0001")
    assert not os.path.exists(f"{p.stage('online')}/versions/v0001") and os.path.isdir(p.stage("online"))
    p.remove(f"{p.stage('online')}/versions/v0009")  # absent: nothing to do
