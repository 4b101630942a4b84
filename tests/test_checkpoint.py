import json
import os

import pytest
import torch

from deepkiln.checkpoint import CONFIG, MANIFEST, WEIGHTS, load_checkpoint, load_model, save_checkpoint
from deepkiln.config import Config
from deepkiln.model import PRESETS, Gate, Transformer


@pytest.fixture
def saved(tmp_path):
    model = Transformer(PRESETS["tiny"]).to(torch.bfloat16)
    for g in (m for m in model.modules() if isinstance(m, Gate)):
        g.bias.copy_(torch.randn_like(g.bias) * 1e-3)
    cfg = Config().to_dict()
    path = save_checkpoint(tmp_path / "step_10", model, cfg, step=10, tokens=1234)
    return model, path


def test_round_trip_is_bit_exact(saved):
    model, path = saved
    loaded, ckpt = load_model(path, PRESETS["tiny"])
    assert ckpt.manifest["step"] == 10 and ckpt.manifest["tokens"] == 1234
    assert ckpt.config["model"] == PRESETS["tiny"].model_dump(mode="json")
    a, b = model.state_dict(), loaded.to(torch.bfloat16).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    tokens = torch.randint(0, 4096, (1, 9))
    assert torch.equal(model.eval()(tokens)[0], loaded.eval()(tokens)[0])


def test_truncated_weights_are_refused_naming_the_file(saved):
    _, path = saved
    weights = path / WEIGHTS
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(ValueError, match=f"{WEIGHTS}.*truncated"):
        load_checkpoint(path)


def test_corrupt_byte_is_refused(saved):
    _, path = saved
    data = bytearray((path / WEIGHTS).read_bytes())
    data[-5] ^= 0xFF
    (path / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{WEIGHTS}.*corrupt"):
        load_checkpoint(path)


def test_missing_manifest_is_refused_naming_it(saved):
    _, path = saved
    os.remove(path / MANIFEST)
    with pytest.raises(ValueError, match=f"{MANIFEST} is missing"):
        load_checkpoint(path)


def test_missing_weights_are_refused_naming_them(saved):
    _, path = saved
    os.remove(path / WEIGHTS)
    with pytest.raises(ValueError, match=f"{WEIGHTS} is missing"):
        load_checkpoint(path)


def test_config_mismatch_is_refused_naming_fields(saved):
    _, path = saved
    other = PRESETS["tiny"].model_copy(update={"dim": 96, "n_layers": 4})
    with pytest.raises(ValueError, match=r"model\.dim: checkpoint has 64, expected 96.*model\.n_layers"):
        load_checkpoint(path, other)
    # A compute-only switch is not a mismatch.
    load_checkpoint(path, PRESETS["tiny"].model_copy(update={"moe_impl": "loop"}))


def test_overwrite_is_atomic_and_leaves_no_temporaries(saved, tmp_path):
    model, path = saved
    save_checkpoint(path, model, Config().to_dict(), step=20)
    assert load_checkpoint(path).manifest["step"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10"]
    assert sorted(p.name for p in path.iterdir()) == sorted([WEIGHTS, CONFIG, MANIFEST])
    assert json.loads((path / CONFIG).read_text())["model"]["dim"] == 64


def test_crash_before_rename_leaves_nothing_loadable(tmp_path, monkeypatch):
    model = Transformer(PRESETS["tiny"])

    def crash(*args):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "step_5", model, Config().to_dict(), step=5)
    monkeypatch.undo()
    assert not (tmp_path / "step_5").exists()
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "step_5")
