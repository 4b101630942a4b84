"""The model's shape: one flat ModelArgs grouped by comment headers, and the named presets. Plain
pydantic, no torch: the config tree, the curation actors and the HTTP ingress import it without
paying for torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator


class ModelArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    # vocabulary and depth
    vocab_size: int = 4096
    """Token vocabulary (embedding rows and head outputs)."""
    dim: int = 64
    """Model width."""
    n_layers: int = 3
    """Transformer blocks in the main model."""
    n_dense_layers: int = 1
    """Leading blocks with a dense MLP instead of MoE."""
    n_heads: int = 4
    """Attention heads."""
    max_seq_len: int = 256
    """Longest sequence the model serves; beyond original_seq_len it turns YaRN on."""
    inter_dim: int = 128
    """Hidden width of the dense MLP."""
    # mla
    q_lora_rank: int = 32
    """Query compression rank; 0 projects queries directly (V2-Lite)."""
    kv_lora_rank: int = 32
    """Width of the compressed key/value latent c_kv: all the cache keeps besides the rope key."""
    qk_nope_head_dim: int = 16
    """Per-head query/key width without position information."""
    qk_rope_head_dim: int = 8
    """Width of the decoupled rope query per head and of the one rope key shared by all heads."""
    v_head_dim: int = 16
    """Per-head value width."""
    # moe
    moe_inter_dim: int = 32
    """Hidden width of each routed expert (and of each shared expert)."""
    n_routed_experts: int = 8
    """Fine-grained routed experts per MoE layer."""
    n_shared_experts: int = 1
    """Always-on shared experts, fused into one MLP of width n_shared * moe_inter_dim."""
    n_activated_experts: int = 2
    """Routed experts per token (top-k)."""
    n_expert_groups: int = 2
    """Expert groups for group-limited routing; 1 disables it."""
    n_limited_groups: int = 1
    """Groups kept per token."""
    score_func: Literal["softmax", "sigmoid"] = "sigmoid"
    """Router affinity: softmax (V2) or sigmoid with renormalised top-k weights (V3)."""
    route_scale: float = 1.0
    """Multiplier on the routed experts' gate weights."""
    bias_update_rate: float = 1e-3
    """Auxiliary-loss-free balancing step gamma for the per-expert selection bias (sigmoid routers;
    softmax routers keep a zero bias, as DeepSeek-V2)."""
    seq_aux_loss_weight: float = 1e-4
    """Weight of the sequence-wise balance loss."""
    moe_impl: Literal["loop", "grouped", "bmm"] = "grouped"
    """Routed expert compute, same output each: the reference loop; `grouped`, tokens sorted by expert
    and each expert run on its own contiguous slice (no padding, cost independent of imbalance); or
    one batched matmul over a block padded to the busiest expert."""
    # rope and yarn
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_factor: float = 40.0
    """YaRN context extension factor, applied when max_seq_len > original_seq_len."""
    original_seq_len: int = 4096
    """Context length the rope frequencies were trained for."""
    beta_fast: int = 32
    """YaRN: rotations above which frequencies are kept."""
    beta_slow: int = 1
    """YaRN: rotations below which frequencies are fully interpolated."""
    mscale: float = 1.0
    """YaRN attention temperature coefficient."""
    # mtp
    n_mtp_layers: int = 1
    """Multi-token prediction depth (0 or 1); predicts the token after next, training only."""
    mtp_loss_weight: float = 0.3
    """Weight of the MTP loss."""
    # init and norms
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    init_std: float = 0.006
    """Std of the normal init of every linear and embedding weight (DeepSeek's; tiny uses 0.02)."""
    init: str = ""
    """Start from published weights: a local folder in DeepSeek's layout (config.json + safetensors, e.g. a
    downloaded DeepSeek-V2-Lite, or one `pipelines.export --format hf` wrote). The model's shape is then
    its config.json's (the shape keys set here are replaced; moe_impl and the training keys stay);
    training starts from its weights, and its tokenizer replaces the tokenizer stage's training."""

    @model_validator(mode="after")
    def _check(self) -> ModelArgs:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        for key in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_expert_groups"):
            need(getattr(self, key) >= 1, f"model.{key}={getattr(self, key)} must be >= 1")
        need(0 <= self.n_dense_layers <= self.n_layers,
             f"model.n_dense_layers={self.n_dense_layers} must be in 0..n_layers={self.n_layers}")
        need(self.qk_rope_head_dim % 2 == 0, f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        need(self.n_mtp_layers in (0, 1), f"model.n_mtp_layers={self.n_mtp_layers} must be 0 or 1")
        if self.n_dense_layers < self.n_layers or self.n_mtp_layers:
            need(1 <= self.n_activated_experts <= self.n_routed_experts,
                 f"model.n_activated_experts={self.n_activated_experts} must be in "
                 f"1..n_routed_experts={self.n_routed_experts}")
            need(self.n_routed_experts % self.n_expert_groups == 0,
                 f"model.n_routed_experts={self.n_routed_experts} is not divisible by "
                 f"n_expert_groups={self.n_expert_groups}")
            need(1 <= self.n_limited_groups <= self.n_expert_groups,
                 f"model.n_limited_groups={self.n_limited_groups} must be in 1..n_expert_groups={self.n_expert_groups}")
            per_group = self.n_routed_experts // self.n_expert_groups
            need(self.n_activated_experts <= self.n_limited_groups * per_group,
                 f"model.n_activated_experts={self.n_activated_experts} exceeds the "
                 f"{self.n_limited_groups * per_group} experts in the n_limited_groups kept")
        return self


# Fields that are not the model's shape (how it computes, where its first weights came from):
# checkpoints load across them.
RUNTIME_FIELDS = frozenset({"moe_impl", "init"})
# Fields an imported model (model.init) keeps from the config: the rest is its config.json's shape.
TRAINING_FIELDS = frozenset({"moe_impl", "init", "bias_update_rate", "seq_aux_loss_weight", "mtp_loss_weight",
                             "init_std"})

PRESETS: dict[str, ModelArgs] = {
    # Trains on a CPU in seconds; every feature on (q compression, groups, sigmoid, MTP). Tests use it.
    "tiny": ModelArgs(init_std=0.02),
    # One GPU node; also the CPU benchmark shape.
    "small": ModelArgs(
        vocab_size=32768, dim=512, n_layers=8, n_dense_layers=1, n_heads=8, max_seq_len=2048,
        inter_dim=2048, q_lora_rank=0, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, moe_inter_dim=512, n_routed_experts=16, n_shared_experts=1,
        n_activated_experts=4, n_expert_groups=1, n_limited_groups=1, score_func="sigmoid",
        route_scale=1.0, n_mtp_layers=1),
    # Published shapes (FACTS.md); build them on the meta device to count parameters.
    "v2-lite": ModelArgs(
        vocab_size=102400, dim=2048, n_layers=27, n_dense_layers=1, n_heads=16, max_seq_len=163840,
        inter_dim=10944, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, moe_inter_dim=1408, n_routed_experts=64, n_shared_experts=2,
        n_activated_experts=6, n_expert_groups=1, n_limited_groups=1, score_func="softmax",
        route_scale=1.0, mscale=0.707, n_mtp_layers=0),
    "v3": ModelArgs(
        vocab_size=129280, dim=7168, n_layers=61, n_dense_layers=3, n_heads=128, max_seq_len=163840,
        inter_dim=18432, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, moe_inter_dim=2048, n_routed_experts=256, n_shared_experts=1,
        n_activated_experts=8, n_expert_groups=8, n_limited_groups=4, score_func="sigmoid",
        route_scale=2.5, mscale=1.0, n_mtp_layers=1, mtp_loss_weight=0.3),
}
