import json
from pathlib import Path

import pytest

from deepkiln.config import Config, load_config, save_config
from deepkiln.model import PRESETS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1e-3\n  steps: 7\n")
    cfg = load_config(["--config", path, "--train.lr=5e-4"])
    assert cfg.train.lr == 5e-4            # CLI beats YAML
    assert cfg.train.steps == 7            # YAML beats default
    assert cfg.train.warmup_steps == 20    # default
    assert load_config([]).train.lr == 3e-3


def test_yaml_scientific_notation_is_cast_to_float(tmp_path):
    cfg = load_config(["--config", write(tmp_path, "train:\n  lr: 1e-3\n")])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1e-3


def test_cli_space_separated_and_list_values():
    cfg = load_config(["--train.steps", "12", "--quant.keep=[head, gate]"])
    assert cfg.train.steps == 12 and cfg.quant.keep == ["head", "gate"]
    assert load_config(["--online.reward_model="]).online.reward_model == ""  # an empty text, not null


@pytest.mark.parametrize("argv, key", [
    (["--train.lrr=1"], "train.lrr"),
    (["--bogus.x=1"], "bogus"),
    (["--model.dimm=8"], "model.dimm"),
])
def test_unknown_key_is_named(argv, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(argv)


def test_unknown_key_in_yaml_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"serve\.prot"):
        load_config(["--config", write(tmp_path, "serve:\n  prot: 1\n")])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ValueError, match=r"train\.lr.*'fast'"):
        load_config(["--train.lr=fast"])
    with pytest.raises(ValueError, match=r"train\.steps.*'2\.5'"):
        load_config(["--train.steps=2.5"])


@pytest.mark.parametrize("argv, message", [
    (["--privacy.enabled=true", "--train.zero_stage=2"], r"privacy\.enabled.*zero_stage"),
    (["--model.n_activated_experts=9"], r"model\.n_activated_experts=9.*n_routed_experts=8"),
    (["--model.n_limited_groups=3"], r"model\.n_limited_groups=3"),
    (["--train.seq_len=4096"], r"train\.seq_len=4096.*max_seq_len"),
    (["--train.zero_stage=4"], r"train\.zero_stage=4"),
    (["--tokenizer.vocab_size=100"], r"tokenizer\.vocab_size=100 must be >= 265"),
    (["--tokenizer.vocab_size=8000"], r"tokenizer\.vocab_size=8000 exceeds model\.vocab_size=4096"),
    (["--data.bands=30", "--data.rows=5"], r"data\.bands x data\.rows = 150 exceeds data\.num_perm=128"),
    (["--model.preset=huge"], r"model\.preset='huge'"),
    (["--train.seq_len_start=16"], r"train\.curriculum_steps=0 must be >= 1"),
    (["--tune.reports=60", "--tune.max_steps=50"], r"tune\.reports=60 exceeds tune\.max_steps=50"),
    (["--tune.num_samples=0"], r"tune\.num_samples=0 must be >= 1"),
    (["--serve.max_queue=0"], r"serve\.max_queue=0 must be >= 1"),
    (["--serve.replica_cpus=0"], r"serve\.replica_cpus=0 must be > 0"),
    (["--serve.max_step_tokens=4"], r"serve\.max_step_tokens=4 must be 0 or >= serve\.max_batch=8"),
    (["--feedback.collectors=0"], r"feedback\.collectors=0 must be >= 1"),
    (["--feedback.rating_min=5", "--feedback.rating_max=5"], r"feedback\.rating_min=5 must be below feedback\.rating_max=5"),
    (["--serve.torch_threads=-1"], r"serve\.torch_threads=-1 must be >= 0"),
    (["--serve.response_cache=-1"], r"serve\.response_cache=-1 must be >= 0"),
    (["--serve.stream_interval_ms=-5"], r"serve\.stream_interval_ms=-5 must be >= 0"),
    (["--run.name=/home/user"], r"run\.name='/home/user' must be a single folder name"),
    (["--run.name=../x"], r"run\.name='\.\./x' must be a single folder name"),
    (["--data.quality.min_units=5000"], r"data\.quality\.min_units=5000 exceeds data\.quality\.max_units=2048"),
    (["--online.params=full"], r"online\.params=full contradicts online\.method=lora"),
    (["--online.desirable_min=9"], r"online\.desirable_min=9 is outside the rating scale"),
    (["--online.desirable_min=2"], r"online\.undesirable_max \(2\) must be below online\.desirable_min \(2\)"),
    (["--online.rule_rewards=[long]"], r"online\.rule_rewards\.0: Input should be 'short' or 'stop'"),
    (["--online.method=grpo", "--online.group_size=1"], r"online\.group_size=1 must be >= 2"),
    (["--online.method=grpo", "--online.params=full", "--train.zero_stage=3"], r"needs train\.zero_stage below 3"),
])
def test_impossible_combinations_are_refused(argv, message):
    with pytest.raises(ValueError, match=message):
        load_config(argv)


def test_model_preset_then_field_overrides(tmp_path):
    cfg = load_config(["--config", write(tmp_path, "model:\n  preset: small\n"), "--model.n_layers=4"])
    assert cfg.model.n_layers == 4
    assert cfg.model.dim == PRESETS["small"].dim
    assert cfg.model.vocab_size == PRESETS["small"].vocab_size


@pytest.mark.parametrize("method", ["lora", "full", "dpo", "kto", "grpo"])
def test_round_trip_through_json(tmp_path, method):
    # A rank rebuilds its config from the driver's dict: every online.method must survive it.
    cfg = load_config(["--model.preset=small", "--train.lr=1e-4", "--quant.format=int8", f"--online.method={method}"])
    save_config(cfg, tmp_path / "config.json")
    back = Config.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert back == cfg
    assert back.to_dict() == cfg.to_dict()


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="nope.yaml"):
        load_config(["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("preset", ["tiny", "small", "v2-lite"])
def test_shipped_presets_load(preset):
    cfg = load_config(["--config", str(CONFIGS / f"{preset}.yaml")])
    assert cfg.model.vocab_size >= cfg.tokenizer.vocab_size


def test_help_lists_every_key_with_its_doc(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_config(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--train.lr=0.003  Peak learning rate." in out
    assert "--model.kv_lora_rank=32" in out and "--online.buffer_size=10000" in out


def test_quality_thresholds_are_a_config_section(tmp_path):
    path = write(tmp_path, "data:\n  quality:\n    max_digit_ratio: 0.5\n    max_top_ngram_char_ratio: {2: 0.3}\n")
    cfg = load_config(["--config", path, "--data.quality.min_units=8"])
    q = cfg.data.quality
    assert q.max_digit_ratio == 0.5 and q.max_top_ngram_char_ratio == {2: 0.3} and q.min_units == 8
    assert Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"data\.quality\.max_digit_ratio=2 must be <= 1"):
        load_config(["--data.quality.max_digit_ratio=2"])


def test_a_perplexity_filter_without_reference_text_is_refused():
    with pytest.raises(ValueError, match="data.max_perplexity_percentile=0.9 needs data.quality_reference"):
        load_config(["--data.max_perplexity_percentile=0.9"])
    assert load_config(["--data.quality_reference=trusted/"]).data.quality_reference == ["trusted/"]
    with pytest.raises(ValueError, match="data.simhash_distance=5 exceeds data.simhash_max_distance=4"):
        load_config(["--data.simhash_distance=5", "--data.simhash_max_distance=4"])

