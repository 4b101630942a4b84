import os
import tempfile

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray for every test that needs it (2 CPUs, no dashboard, its own temp dir).
    Yields the fault-injection marker: it exists (disarmed); a test deletes it to arm one SIGKILL."""
    import ray

    marker = tmp_path_factory.mktemp("fault") / "kill-once"
    marker.touch()
    os.environ["DEEPKILN_KILL_ONCE"] = str(marker)  # inherited by Ray's worker processes
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    yield marker
    ray.shutdown()
