"""The install: `make` installs exactly the locked versions, and the package works without the
repository's tests (a non-editable install has none)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_environment_holds_exactly_the_locked_versions():
    locked = {line.strip() for line in (REPO / "requirements.lock").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                            text=True, check=True).stdout.split()
    frozen = {line for line in frozen if not line.lower().startswith("deepkiln")}
    assert frozen == locked, {"not locked": sorted(frozen - locked), "missing": sorted(locked - frozen)}


@pytest.mark.slow
def test_benchmarks_run_from_a_non_editable_install(tmp_path):
    # Built from a copy of the tracked files: a build leaves build/ and *.egg-info beside the source.
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tmp_path / "src" / name)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                    "--target", str(target), str(tmp_path / "src")], check=True, capture_output=True)
    assert not (target / "tests").exists() and (target / "bench" / "serve.py").is_file()
    shipped = {p.name for p in (REPO / "deepkiln" / "builtin_zh").iterdir()}
    assert {p.name for p in (target / "deepkiln" / "builtin_zh").iterdir()} == shipped  # the built-in corpus's
    assert {"LICENSE-chinese-poetry", "lunyu.txt", "tang-poems.txt"} <= shipped        # Chinese, and its licence
    assert not [p for p in (target / "bench").glob("*.py") if "from tests" in p.read_text()]
    env = {**os.environ, "PYTHONPATH": str(target)}
    for bench in ("bench.serve", "bench.online", "bench.model"):
        out = subprocess.run([sys.executable, "-m", bench, "--help"], cwd=tmp_path, env=env, capture_output=True,
                             text=True)
        assert out.returncode == 0 and "usage" in out.stdout, (bench, out.stderr[-2000:])
    imported = subprocess.run([sys.executable, "-c", "import bench.serve, bench.online, deepkiln.testing; "
                               "print(bench.serve.__file__)"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert imported.stdout.startswith(str(target)), imported.stderr[-2000:]
