"""A DeepSeek-V2/V3 style decoder from stock PyTorch layers: MLA attention, DeepSeekMoE, MTP.

References: DeepSeek-V2 (arXiv:2405.04434) and DeepSeek-V3 (arXiv:2412.19437) technical reports.
The model is plain PyTorch; DeepSpeed, activation checkpointing, the balancing-bias step, quantization,
LoRA and the KV cache are applied from outside (deepkiln.training, quantize, lora, engine).

Shape legend: B batch, T query tokens, S key tokens, H heads, D model dim, R kv_lora_rank,
E routed experts, K experts per token, N = B*T tokens, C expert capacity (padded tokens per expert).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from deepkiln.model_args import PRESETS, RUNTIME_FIELDS, ModelArgs  # noqa: F401  (re-exported: the model's shapes)


# ---------------------------------------------------------------------------------------- rope

def _yarn_enabled(args: ModelArgs) -> bool:
    return args.rope_factor > 1 and args.max_seq_len > args.original_seq_len


def rope_angles(args: ModelArgs, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, T, Dr/2), fp32, for integer positions (B, T); YaRN-scaled when enabled.

    Computed per call from args rather than kept in a buffer, so module-wide dtype casts
    (.bfloat16(), DeepSpeed bf16) never round the frequencies.
    """
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
    if _yarn_enabled(args):
        # Interpolate low frequencies by rope_factor, keep high ones, ramp between (YaRN).
        def correction_dim(rotations: float) -> float:
            return dim * math.log(args.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(args.beta_fast)), 0)
        high = min(math.ceil(correction_dim(args.beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=positions.device) - low)
                / max(high - low, 1e-3)).clamp(0, 1)
        freqs = freqs / args.rope_factor * ramp + freqs * (1 - ramp)
    angles = positions.to(torch.float32)[..., None] * freqs  # (B, T, Dr/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, T, H, Dr) by the angles (B, T, Dr/2), in fp32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, H, Dr/2) each
    c, s = cos[:, :, None], sin[:, :, None]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)


# ---------------------------------------------------------------------------------------- attention

class MLA(nn.Module):
    """Multi-head latent attention: keys and values come from one RMS-normed latent c_kv (R wide);
    position goes on a separate rope key shared by all heads, so wkv_b can be absorbed at inference."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.rank, self.q_lora_rank = args.n_heads, args.kv_lora_rank, args.q_lora_rank
        self.nope, self.rope, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        qk_dim = self.nope + self.rope
        if self.q_lora_rank == 0:
            self.wq = nn.Linear(args.dim, self.n_heads * qk_dim, bias=False)
        else:
            self.wq_a = nn.Linear(args.dim, args.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(args.q_lora_rank, eps=args.norm_eps)
            self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(args.dim, self.rank + self.rope, bias=False)
        self.kv_norm = nn.RMSNorm(self.rank, eps=args.norm_eps)
        self.wkv_b = nn.Linear(self.rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_dim, args.dim, bias=False)
        self.softmax_scale = qk_dim ** -0.5
        if _yarn_enabled(args):
            m = 0.1 * args.mscale * math.log(args.rope_factor) + 1.0
            self.softmax_scale *= m * m

    def forward(self, x, rope, cache=None, absorb: bool = False):
        B, T, _ = x.shape
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, *rope)
        c_kv, k_pe = self.wkv_a(x).split([self.rank, self.rope], dim=-1)
        c_kv = self.kv_norm(c_kv)                                   # (B, T, R)
        k_pe = apply_rope(k_pe[:, :, None], *rope)[:, :, 0]         # (B, T, Dr)
        mask = None                                                 # plain causal over T
        if cache is not None:  # all keys of these rows so far, and which each query may see
            c_kv, k_pe, mask = cache.update(self.layer_id, c_kv, k_pe)  # (B,S,R) (B,S,Dr) (B,T,S)
        attend = self._absorbed if absorb else self._naive
        return self.wo(attend(q_nope, q_pe, c_kv, k_pe, mask).flatten(2))

    def _naive(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Up-project the latent to per-head keys and values, then standard attention."""
        B, S, _ = c_kv.shape
        k_nope, v = self.wkv_b(c_kv).view(B, S, self.n_heads, -1).split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = F.scaled_dot_product_attention(                       # (B, H, T, Dv)
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask[:, None], is_causal=mask is None,
            scale=self.softmax_scale)
        return out.transpose(1, 2)                                  # (B, T, H, Dv)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Attend in the latent space: fold wkv_b's key half into the query and its value half
        into the output, so keys and values are never materialised per head. Batched matmuls
        rather than einsums: about 30% faster at decode shapes here."""
        B, T, H, _ = q_nope.shape
        S = c_kv.shape[1]
        w = self.wkv_b.weight.view(H, self.nope + self.v_dim, self.rank)
        q_lat = torch.matmul(q_nope.transpose(1, 2), w[:, :self.nope])              # (B, H, T, R)
        q = torch.cat([q_lat, q_pe.transpose(1, 2)], dim=-1).flatten(1, 2)          # (B, H*T, R+Dr)
        k = torch.cat([c_kv, k_pe], dim=-1)                                         # (B, S, R+Dr)
        scores = torch.bmm(q, k.transpose(1, 2)).float().view(B, H, T, S) * self.softmax_scale
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=c_kv.device).tril(S - T)[None]
        probs = scores.masked_fill(~mask[:, None], float("-inf")).softmax(dim=-1).type_as(c_kv)
        out_lat = torch.bmm(probs.flatten(1, 2), c_kv).view(B, H, T, self.rank)    # (B, H, T, R)
        return torch.matmul(out_lat, w[:, self.nope:].transpose(1, 2)).transpose(1, 2)  # (B, T, H, Dv)


# ---------------------------------------------------------------------------------------- ffn

class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """Router: affinities from an nn.Linear, top-k selection on affinity + balancing bias, weights
    from the un-biased affinities. The bias is fp32, moved only by the training side's balancing step
    (deepkiln.training.update_expert_bias), never by gradients, and only for sigmoid routers: softmax
    routers keep it at zero, as DeepSeek-V2 has none; in training mode the gate counts the tokens
    routed to each expert for that step."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.proj = nn.Linear(args.dim, args.n_routed_experts, bias=False)
        self.register_buffer("bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))
        # Tokens routed to each expert since the last bias update (summed over micro-batches).
        self.register_buffer("counts", torch.zeros(args.n_routed_experts, dtype=torch.long), persistent=False)
        self.counting = True
        """Off while activation checkpointing recomputes the block: each token is counted once."""
        self.replay: torch.Tensor | None = None
        """Expert ids (N, K) to route to instead of choosing, set from outside: GRPO replays the
        rollout's choices in its training forwards (deepkiln.preferences.replayed_routes)."""

    def forward(self, x):
        """x (N, D) -> weights (N, K) in x's dtype, expert ids (N, K), affinities (N, E) fp32."""
        a = self.args
        scores = self.proj(x).float()
        scores = scores.softmax(dim=-1) if a.score_func == "softmax" else scores.sigmoid()
        biased = scores + self.bias                                  # used for selection only
        if a.n_expert_groups > 1:
            groups = biased.view(x.size(0), a.n_expert_groups, -1)   # (N, G, E/G)
            # Rank groups as the published models do: V3 (sigmoid) by the sum of each group's top-2,
            # V2 (softmax) by its best expert.
            rank = (groups.topk(2, dim=-1).values.sum(-1) if a.score_func == "sigmoid"
                    else groups.amax(dim=-1))                        # (N, G)
            keep = torch.zeros_like(rank, dtype=torch.bool).scatter_(
                1, rank.topk(a.n_limited_groups, dim=-1).indices, True)
            biased = groups.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        idx = biased.topk(a.n_activated_experts, dim=-1).indices if self.replay is None else self.replay  # (N, K)
        weights = scores.gather(1, idx)
        if a.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.training and self.counting:
            self.counts += torch.bincount(idx.flatten(), minlength=a.n_routed_experts)
        return (weights * a.route_scale).type_as(x), idx, scores

    def _apply(self, fn, recurse=True):
        # Module-wide casts (.bfloat16(), DeepSpeed bf16) must not round the bias: a 1e-3 step
        # vanishes in bf16. Move it to the new device but keep its fp32 value.
        bias = self.bias
        super()._apply(fn, recurse)
        if bias.is_meta or self.bias.is_meta:
            self.bias = self.bias.float()
        else:
            self.bias = bias.to(device=self.bias.device, dtype=torch.float32)
        return self


class MoE(nn.Module):
    """DeepSeekMoE: shared experts on every token plus top-k of many fine-grained routed experts.
    No token is dropped. Returns the output and the sequence-wise balance loss."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.gate = Gate(args)
        self.experts = nn.ModuleList(MLP(args.dim, args.moe_inter_dim) for _ in range(args.n_routed_experts))
        self.shared = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim)

    def forward(self, x):
        B, T, D = x.shape
        flat = x.reshape(-1, D)                                      # (N, D)
        weights, idx, scores = self.gate(flat)
        routed = {"loop": self._routed_loop, "grouped": self._routed_grouped, "bmm": self._routed_bmm}[self.args.moe_impl]
        y = routed(flat, weights, idx) + self.shared(flat)
        return y.view(B, T, D), self._balance_loss(scores, idx, B, T)

    def _routed_loop(self, x, weights, idx):
        """Reference: each expert runs on the tokens that chose it."""
        y = torch.zeros_like(x)
        for e, count in enumerate(torch.bincount(idx.flatten(), minlength=len(self.experts)).tolist()):
            if count:
                tok, slot = torch.where(idx == e)
                y.index_add_(0, tok, self.experts[e](x[tok]) * weights[tok, slot, None])
        return y

    def _routed_grouped(self, x, weights, idx):
        """Same result as the loop: assignments sorted by expert once, then one MLP call per expert
        on its contiguous slice of the sorted tokens; no padding, so a busy expert costs only its own
        tokens."""
        K = idx.size(1)
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        token = order // K
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        # Every expert runs, even on an empty slice: its weights then get a (zero) gradient on every
        # rank, so data-parallel ranks reduce the same set of gradients whatever the routing.
        outs = [expert(chunk) for expert, chunk in zip(self.experts, x[token].split(counts))]
        out = torch.cat(outs) * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token, out)

    def _routed_bmm(self, x, weights, idx):
        """Same result as the loop: tokens sorted into a zero-padded (E, C, D) block and every expert
        run in one batched matmul, from the experts' own nn.Linear weights stacked per call. The path
        ONNX export takes: its sort need not be stable (a token's slot within its expert's block does
        not change its output), and a stable sort has no ONNX translation."""
        N, K = idx.shape
        E, D = len(self.experts), x.size(1)
        flat = idx.flatten()                                         # (N*K,) expert of each assignment
        order = flat.argsort()
        expert = flat[order]
        counts = torch.bincount(flat, minlength=E)
        slot = torch.arange(N * K, device=x.device) - (counts.cumsum(0) - counts)[expert]
        token = order // K
        xs = x.new_zeros(E, counts.max().item(), D)                 # (E, C, D); .item(): exportable
        xs[expert, slot] = x[token]
        w1, w2, w3 = (torch.stack([getattr(m, name).weight for m in self.experts])
                      for name in ("w1", "w2", "w3"))               # (E, I, D) (E, D, I) (E, I, D)
        h = F.silu(torch.bmm(xs, w1.transpose(1, 2))) * torch.bmm(xs, w3.transpose(1, 2))
        out = torch.bmm(h, w2.transpose(1, 2))[expert, slot]        # (N*K, D)
        return torch.zeros_like(x).index_add_(0, token, out * weights.flatten()[order, None])

    def _balance_loss(self, scores, idx, B, T):
        """Sequence-wise balance loss (V3 eq. 17-20): alpha * sum_e f_e * P_e per sequence."""
        a = self.args
        if not (self.training and a.seq_aux_loss_weight > 0):
            return scores.new_zeros(())
        E, K = a.n_routed_experts, a.n_activated_experts
        probs = (scores / scores.sum(dim=-1, keepdim=True)).view(B, T, E)
        chosen = torch.zeros_like(probs).scatter_(2, idx.view(B, T, K), 1.0)
        f = chosen.sum(dim=1) * E / (K * T)                         # (B, E)
        return a.seq_aux_loss_weight * (f * probs.mean(dim=1)).sum(dim=-1).mean()


# ---------------------------------------------------------------------------------------- model

class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attn = MLA(layer_id, args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn = MLP(args.dim, args.inter_dim) if layer_id < args.n_dense_layers else MoE(args)

    def forward(self, x, rope, cache=None, absorb: bool = False):
        x = x + self.attn(self.attn_norm(x), rope, cache, absorb)
        if isinstance(self.ffn, MoE):
            h, balance = self.ffn(self.ffn_norm(x))
        else:
            h, balance = self.ffn(self.ffn_norm(x)), x.new_zeros((), dtype=torch.float32)
        return x + h, balance


class MTP(nn.Module):
    """Multi-token prediction (V3): from the main model's hidden state at t, after its final norm (as
    DeepSeek's inference code, transformers' MtpModel and vLLM's MTP drafter feed it), and the
    embedding of token t+1, one more block predicts token t+2 through the shared head."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.hidden_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.embed_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.proj = nn.Linear(2 * args.dim, args.dim, bias=False)
        self.block = Block(args.n_layers, args)
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, h, next_embed, rope):
        x = self.proj(torch.cat([self.hidden_norm(h), self.embed_norm(next_embed)], dim=-1))
        x, balance = self.block(x, rope)
        return self.norm(x), balance


class Output(NamedTuple):
    """What Transformer.forward returns."""
    logits: torch.Tensor                    # (B, T, V); (B, 1, V) with logits_at
    balance: torch.Tensor                   # () sequence-wise balance loss of every MoE layer (0 in eval)
    mtp_logits: torch.Tensor | None = None  # (B, T-1, V), with mtp=True: at t, the token at t+2


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)  # untied from embed
        self.mtp = nn.ModuleList(MTP(args) for _ in range(args.n_mtp_layers))
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        # On the meta device there is nothing to initialise (and normal_ there costs ~1 ms a call).
        if isinstance(m, (nn.Linear, nn.Embedding)) and not m.weight.is_meta:
            nn.init.normal_(m.weight, std=self.args.init_std)

    def forward(self, tokens, *, cache=None, absorb: bool | None = None, logits_at: torch.Tensor | None = None,
                mtp: bool = False) -> Output:
        """tokens (B, T) -> Output(logits, balance, mtp_logits); `lm_losses` turns it into losses.

        With a cache (engine.LatentCache) the tokens extend the cache's selected rows. `absorb`
        picks the absorbed attention path; default: on with a cache. `logits_at` (B,): the head
        runs only at that position of each row (inference needs only each row's last real token).
        `mtp`: also run the MTP module (training), whose balance term joins the main model's.
        """
        B, T = tokens.shape
        absorb = cache is not None if absorb is None else absorb
        positions = torch.arange(T, device=tokens.device).expand(B, T) if cache is None else cache.positions(T)
        rope = rope_angles(self.args, positions)
        h = self.embed(tokens)
        balance = torch.zeros((), device=tokens.device)
        for layer in self.layers:
            h, b = layer(h, rope, cache, absorb)
            balance = balance + b
        if cache is not None:
            cache.advance(T)
        last = h if logits_at is None else h[torch.arange(B, device=h.device), logits_at][:, None]
        logits = self.head(self.norm(last))
        mtp_logits = None
        if mtp and self.mtp and T > 1:
            # Position t sees token t+1 (= tokens[:, t+1]) and predicts token t+2.
            cos, sin = rope
            # The final norm's output, as DeepSeek's inference feeds the MTP module; its weight is the
            # main head's input scale and is trained by the main loss alone.
            normed = F.rms_norm(h[:, :-1], self.norm.normalized_shape, self.norm.weight.detach(), self.norm.eps)
            m, b = self.mtp[0](normed, self.embed(tokens[:, 1:]), (cos[:, :-1], sin[:, :-1]))
            mtp_logits = self.head(m)
            balance = balance + b
        return Output(logits, balance, mtp_logits)


def lm_losses(out: Output, targets: torch.Tensor, args: ModelArgs) -> dict[str, torch.Tensor]:
    """The training losses of a forward with targets (B, T; -100 ignored): `lm` (next token), `mtp`
    (the token after next, 0 without MTP logits), `balance`, and their weighted sum `loss`."""
    lm = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    mtp = torch.zeros((), device=targets.device)
    if out.mtp_logits is not None:
        mtp = F.cross_entropy(out.mtp_logits.flatten(0, 1).float(), targets[:, 1:].flatten(), ignore_index=-100)
    loss = lm + args.mtp_loss_weight * mtp + out.balance
    return {"lm": lm, "mtp": mtp, "balance": out.balance, "loss": loss}


def count_params(model: Transformer) -> tuple[int, int]:
    """(total, active) parameters of the main model, MTP excluded. Active counts the top-k share of
    routed experts and leaves out the input embedding, a lookup rather than a matmul."""
    a = model.args
    total = active = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            continue
        total += p.numel()
        if name.startswith("embed."):
            continue
        active += p.numel() * a.n_activated_experts // a.n_routed_experts if ".experts." in name else p.numel()
    return total, active
