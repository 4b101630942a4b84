"""A DeepSeek checkpoint folder's config.json <-> deepkiln's ModelArgs. No torch: the config tree
reads `model.init`'s shape through it.

    config = hf_config(args, bos_id=2, eos_id=[3, 7])   # what transformers builds and vLLM routes by
    args = read_hf_args(folder)                          # refuses what deepkiln cannot compute the same way
"""

from __future__ import annotations

import json
from pathlib import Path

from deepkiln.model_args import ModelArgs

CONFIG = "config.json"


def _yarn(args: ModelArgs) -> bool:
    return args.rope_factor > 1 and args.max_seq_len > args.original_seq_len


def hf_config(args: ModelArgs, *, bos_id: int, eos_id: int | list[int], dtype: str = "bfloat16") -> dict:
    """config.json of the exported folder: what transformers builds the model from and what vLLM
    needs to route as deepkiln does (scoring_func and topk_method, which transformers' own
    save_pretrained leaves out)."""
    v3 = args.score_func == "sigmoid"
    config = {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "vocab_size": args.vocab_size, "hidden_size": args.dim, "intermediate_size": args.inter_dim,
        "moe_intermediate_size": args.moe_inter_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_heads,
        "n_shared_experts": args.n_shared_experts, "n_routed_experts": args.n_routed_experts,
        "num_experts_per_tok": args.n_activated_experts, "routed_scaling_factor": args.route_scale,
        "n_group": args.n_expert_groups, "topk_group": args.n_limited_groups,
        "topk_method": "noaux_tc" if v3 else ("group_limited_greedy" if args.n_expert_groups > 1 else "greedy"),
        "scoring_func": args.score_func, "norm_topk_prob": v3,
        "first_k_dense_replace": args.n_dense_layers, "moe_layer_freq": 1,
        "q_lora_rank": args.q_lora_rank or None, "kv_lora_rank": args.kv_lora_rank,
        "qk_nope_head_dim": args.qk_nope_head_dim, "qk_rope_head_dim": args.qk_rope_head_dim,
        "v_head_dim": args.v_head_dim, "hidden_act": "silu", "attention_bias": False,
        "max_position_embeddings": args.max_seq_len, "rope_theta": args.rope_theta, "rope_interleave": True,
        "rms_norm_eps": args.norm_eps, "initializer_range": args.init_std, "tie_word_embeddings": False,
        "num_nextn_predict_layers": args.n_mtp_layers, "aux_loss_alpha": args.seq_aux_loss_weight,
        "seq_aux": True, "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": dtype,
        "use_cache": True,
    }
    if _yarn(args):
        config["rope_scaling"] = {"type": "yarn", "factor": args.rope_factor,
                                  "original_max_position_embeddings": args.original_seq_len,
                                  "beta_fast": args.beta_fast, "beta_slow": args.beta_slow,
                                  "mscale": args.mscale, "mscale_all_dim": args.mscale}
    return config


def read_hf_args(folder: str | Path) -> ModelArgs:
    """The ModelArgs of the folder's config.json."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise ValueError(f"model.init={folder}: {path} is missing (a folder in DeepSeek's published layout holds one)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return model_args_from_hf(config, str(path))


def model_args_from_hf(config: dict, where: str = CONFIG) -> ModelArgs:
    """The ModelArgs of a published DeepSeek-V2/V3 config.json; refuses, naming the key, what deepkiln's
    model cannot compute the same way."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"{where}: {msg}")

    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(config).__name__}")
    required = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                "n_routed_experts", "num_experts_per_tok")
    missing = [k for k in required if k not in config]
    need(not missing, "missing " + ", ".join(missing))
    kind = config.get("model_type")
    need(kind in ("deepseek_v2", "deepseek_v3"), f"model_type={kind!r}: only deepseek_v2 and deepseek_v3 import")
    v3 = kind == "deepseek_v3"
    score = config.get("scoring_func", "sigmoid" if v3 else "softmax")
    need(score in ("sigmoid", "softmax"), f"scoring_func={score!r} must be sigmoid or softmax")
    need(v3 == (score == "sigmoid"), f"scoring_func={score!r} with model_type={kind!r}: deepkiln routes V3 "
                                      "with sigmoid and V2 with softmax affinities")
    method = config.get("topk_method", "noaux_tc" if v3 else "greedy")
    need(method in (("noaux_tc",) if v3 else ("greedy", "group_limited_greedy")), f"topk_method={method!r} "
         "is not supported (V3: noaux_tc; V2: greedy or group_limited_greedy)")
    need(bool(config.get("norm_topk_prob", v3)) == v3, f"norm_topk_prob={config.get('norm_topk_prob')!r}: "
         f"deepkiln renormalises the top-k weights exactly for sigmoid routers (expected {v3})")
    for key, expected in (("moe_layer_freq", 1), ("hidden_act", "silu"), ("attention_bias", False),
                          ("tie_word_embeddings", False)):
        need(config.get(key, expected) == expected, f"{key}={config.get(key)!r} is not supported (only {expected!r})")
    heads = config["num_attention_heads"]
    need(config.get("num_key_value_heads", heads) == heads, "num_key_value_heads must equal num_attention_heads (MLA)")
    need(not config.get("quantization_config"), "quantization_config is set: quantized (e.g. FP8) weights do not "
         "import; convert them to bf16 first (DeepSeek ships fp8_cast_bf16.py)")
    groups = (config.get("n_group") or 1) if method != "greedy" else 1
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = rope.get("type", rope.get("rope_type", "default"))
    need(rope_type in ("default", "yarn"), f"rope_scaling type {rope_type!r} is not supported (default or yarn)")
    max_len = config.get("max_position_embeddings", 4096)
    yarn = {}
    if rope_type == "yarn":
        mscale, all_dim = rope.get("mscale", 1.0), rope.get("mscale_all_dim", 0)
        need(mscale == all_dim, f"rope_scaling.mscale={mscale} differs from mscale_all_dim={all_dim}: "
             "deepkiln scales attention by one mscale")
        original = rope["original_max_position_embeddings"]
        need(max_len > original and rope["factor"] > 1, f"max_position_embeddings={max_len} must exceed "
             f"rope_scaling.original_max_position_embeddings={original} with factor > 1 for YaRN")
        yarn = {"rope_factor": rope["factor"], "original_seq_len": original, "beta_fast": rope.get("beta_fast", 32),
                "beta_slow": rope.get("beta_slow", 1), "mscale": mscale}
    return ModelArgs(
        vocab_size=config["vocab_size"], dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
        n_dense_layers=min(config.get("first_k_dense_replace", 0), config["num_hidden_layers"]), n_heads=heads,
        max_seq_len=max_len, inter_dim=config["intermediate_size"], q_lora_rank=config.get("q_lora_rank") or 0,
        kv_lora_rank=config["kv_lora_rank"], qk_nope_head_dim=config["qk_nope_head_dim"],
        qk_rope_head_dim=config["qk_rope_head_dim"], v_head_dim=config["v_head_dim"],
        moe_inter_dim=config["moe_intermediate_size"], n_routed_experts=config["n_routed_experts"],
        n_shared_experts=config.get("n_shared_experts") or 0, n_activated_experts=config["num_experts_per_tok"],
        n_expert_groups=groups, n_limited_groups=(config.get("topk_group") or 1) if groups > 1 else 1,
        score_func=score, route_scale=config.get("routed_scaling_factor", 1.0),
        n_mtp_layers=min(config.get("num_nextn_predict_layers", 0), 1), rope_theta=config.get("rope_theta", 10000.0),
        norm_eps=config.get("rms_norm_eps", 1e-6), init_std=config.get("initializer_range", 0.006),
        **(yarn or {"rope_factor": 1.0, "original_seq_len": max_len}))
