import pytest

from bench import model as bench_model
from deepkiln.flops import model_flops_per_token
from deepkiln.model import PRESETS, Transformer, count_params
from deepkiln.precision import compute_dtype, cpu_capability, dtype_name


@pytest.mark.slow
def test_bench_model_prints_its_figures(capsys):
    r = bench_model.main(["--preset", "tiny", "--steps", "1", "--batch", "2", "--seq-len", "32"])
    for key in ("tokens_per_s", "model_flops_per_token", "gemm_peak_flops", "mfu",
                "mla_cache_bytes_per_token", "mha_cache_bytes_per_token"):
        assert r[key] > 0, key
    a = PRESETS["tiny"]
    size = 2 if r["dtype"] == "bfloat16" else 4  # bytes per cached value in the compute dtype
    assert r["mla_cache_bytes_per_token"] == a.n_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * size
    assert r["mha_cache_bytes_per_token"] == a.n_layers * 2 * a.n_heads * a.v_head_dim * size
    assert r["tokens_per_s_other"] > 0 and {r["dtype"], r["other_dtype"]} == {"bfloat16", "float32"}
    assert r["dtype"] == dtype_name(compute_dtype()) and r["cpu_capability"] == cpu_capability()
    assert '"mfu"' in capsys.readouterr().out


def test_flops_per_token_counts_mtp_and_attention():
    import torch

    with torch.device("meta"):
        m = Transformer(PRESETS["small"])
        no_mtp = Transformer(PRESETS["small"].model_copy(update={"n_mtp_layers": 0}))
    _, active = count_params(m)
    f, f0 = model_flops_per_token(m, 256), model_flops_per_token(no_mtp, 256)
    a = PRESETS["small"]
    attn = 3 * a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * 256
    assert f0 == 6 * active + a.n_layers * attn
    assert f > f0 + 6 * m.head.weight.numel()


@pytest.mark.slow
def test_bench_train_prints_its_figures(ray_local, capsys):
    from bench import train as bench_train

    r = bench_train.main(["--preset", "tiny", "--steps", "1", "--batch", "4", "--seq-len", "32"])
    for key in ("tokens_per_s", "tokens_per_s_2", "tokens_per_s_plain", "tokens_per_s_plain_default_malloc",
                "mfu", "overhead_vs_plain", "scaling_2_vs_1"):
        assert r[key] > 0, key
    assert r["overhead_vs_plain"] == pytest.approx(r["tokens_per_s_plain"] / r["tokens_per_s"], rel=0.01)
    assert r["dtype"] == dtype_name(compute_dtype()) and r["cpu_capability"] == cpu_capability()
    assert '"overhead_vs_plain"' in capsys.readouterr().out


@pytest.mark.slow
def test_bench_serve_prints_its_figures(ray_local, served_run, capsys):
    from bench import serve as bench_serve

    r = bench_serve.main(["--levels", "1", "2", "--max-tokens", "4", "--formats", "bf16", "--requests", "1",
                          "--proxy", "python", "--replica-cpus", "0.5", "--rounds", "2",
                          "--run-dir", str(served_run["root"])])
    level = r["bf16"]["levels"]["2"]
    assert level["requests"] == 8 and level["output_tokens_per_s"] > 0 and level["ttft_p50_s"] > 0
    per_round = r["bf16"]["batching_speedup_per_round"]
    assert len(per_round) == 2 and min(per_round) > 0
    assert r["batching_speedup"] == pytest.approx(sum(per_round) / 2, abs=0.002)  # the median of two
    assert r["linear_bytes_ratio_nf4"] >= 3  # nf4 layers' weights against the same layers in bf16
    assert r["perplexity_nf4"] > 0 and r["bytes_nf4"] < r["bytes_bf16"]
    assert '"batching_speedup"' in capsys.readouterr().out


@pytest.mark.slow
def test_bench_serve_adversarial_and_burst_modes_print_their_figures(ray_local, served_run, capsys):
    from bench import serve as bench_serve

    r = bench_serve.main(["--mode", "adversarial", "burst", "--formats", "bf16", "--proxy", "python",
                          "--replica-cpus", "0.5", "--small", "3", "--attackers", "2", "--attack-bytes", "300000",
                          "--burst", "12", "--burst-concurrency", "12", "--burst-n", "4", "--max-tokens", "8",
                          "--set", "serve.max_batch=1", "serve.max_queue=4", "--run-dir", str(served_run["root"])])
    adv = r["adversarial"]
    for mode in ("waves", "flood"):
        assert adv[mode]["attack_status_codes"].keys() == {"413"} and adv[mode]["attack_connection_errors"] == 0
        assert adv[mode]["small_p99_s"] > 0
    assert adv["waves"]["attack_requests"] == 3 * 2  # one prompt per attacker for every small request
    assert adv["p99_ratio"] == pytest.approx(adv["waves"]["small_p99_s"] / adv["small_p99_s_alone"], rel=0.01)
    burst = r["burst"]
    # 12 requests of 4 choices at once against 1 running + 4 queued choices: most are refused whole.
    assert burst["served"] + burst["refused_503"] == 12 and burst["refused_503"] >= 6 and burst["other_status"] == []
    assert burst["refusal_latency_max_s"] is not None
    assert '"p99_ratio"' in capsys.readouterr().out


def test_bench_replay_pages_a_large_store_and_the_buffer_stays_flat(capsys):
    import json

    from bench import replay

    result = replay.main(["--records", "20000", "--updates", "30", "--per-update", "64"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    store, buf = result["store"], result["replay"]
    assert store["records_read"] == 20000 and store["pages"] == 20
    assert store["largest_page_records"] <= store["page_limit_records"]
    assert store["largest_page_bytes"] <= store["page_limit_bytes"]
    # consumed examples leave the buffer: it holds what waits (one update's worth), round after round
    assert buf["consumed"] == 30 * 64 and buf["rows_first"] == buf["rows_last"] == 64


def test_bench_prepare_prints_both_near_dedup_methods_figures(capsys):
    from bench import prepare as bench_prepare

    r = bench_prepare.main(["--docs", "600", "--pairs", "30", "--no-pipeline"])
    assert r["recall"] >= 0.9 and r["precision"] >= 0.9 and r["dedup_speedup_vs_datasketch"] > 0
    assert 0 <= r["simhash_recall"] <= 1 and r["simhash_precision"] >= 0.9 and r["simhash_docs_per_s"] > 0
    assert "docs_per_s_1" not in r and '"simhash_recall"' in capsys.readouterr().out
