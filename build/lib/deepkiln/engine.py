"""Inference: the MLA latent KV cache, sampling, and a step loop that batches decoding.

    engine = Engine(model, max_batch=8, max_len=512)
    done = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=32, temperature=0.8, seed=0))

The cache keeps only what MLA needs: per token and layer the normed latent c_kv (kv_lora_rank) and
the rope key (qk_rope_head_dim). Requests join and leave at any step (continuous batching): the requests
admitted in a step are prefilled in the same forward as the running requests' decodes (rows
right-padded to the longest prompt; a row's padding is never attended to and is overwritten by its
next tokens), or in a forward of their own when the padded step would not fit. The head runs only
at each row's last real token. A step computes at most `max_step_tokens` tokens, padding included
(decodes first, then prefills in arrival order), which bounds its activation memory; `cancel`
frees a request's slot at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from deepkiln.model import ModelArgs, Transformer


class LatentCache:
    """Fixed-size cache of `max_batch` slots x `max_len` tokens. The model reads and writes the slots
    chosen with `select`: `positions` -> `update` per layer -> `advance` once per forward."""

    def __init__(self, args: ModelArgs, max_batch: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        shape = (args.n_layers, max_batch, max_len)
        self.kv = torch.zeros(*shape, args.kv_lora_rank, dtype=dtype, device=device)     # (L, B, S, R)
        self.pe = torch.zeros(*shape, args.qk_rope_head_dim, dtype=dtype, device=device)  # (L, B, S, Dr)
        self.lens = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.max_len = max_len
        self.rows = torch.arange(max_batch, device=device)
        self.lengths: torch.Tensor | None = None

    def values_per_token(self) -> int:
        """Cached values per token, all layers: n_layers * (kv_lora_rank + qk_rope_head_dim)."""
        return self.kv.size(0) * (self.kv.size(-1) + self.pe.size(-1))

    def bytes_per_token(self) -> int:
        return self.values_per_token() * self.kv.element_size()

    def select(self, rows, lengths=None) -> None:
        """Rows the next forward reads and writes. `lengths`: how many of the forward's T tokens are
        real in each row (the rest is right padding); by default all T."""
        self.rows = torch.as_tensor(rows, dtype=torch.long, device=self.lens.device)
        self.lengths = None if lengths is None else torch.as_tensor(lengths, dtype=torch.long, device=self.lens.device)

    def reset(self, rows) -> None:
        self.lens[torch.as_tensor(rows, dtype=torch.long)] = 0

    def positions(self, T: int) -> torch.Tensor:
        """Positions (B, T) of T new tokens in each selected row."""
        return self.lens[self.rows, None] + torch.arange(T, device=self.lens.device)

    def update(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        """Store c_kv (B, T, R) and k_pe (B, T, Dr) after each row's history; return every key so far
        (B, S, R), (B, S, Dr) and the mask (B, T, S) of keys each query may attend to."""
        pos = self.positions(c_kv.size(1))                            # (B, T)
        if int(pos.max()) >= self.max_len:
            raise ValueError(f"sequence of {int(pos.max()) + 1} tokens exceeds the cache's max_len={self.max_len}")
        rows = self.rows[:, None]
        self.kv[layer, rows, pos] = c_kv.to(self.kv.dtype)
        self.pe[layer, rows, pos] = k_pe.to(self.pe.dtype)
        S = int(pos.max()) + 1
        mask = torch.arange(S, device=pos.device) <= pos[:, :, None]  # (B, T, S)
        return self.kv[layer, self.rows, :S], self.pe[layer, self.rows, :S], mask

    def advance(self, T: int) -> None:
        self.lens[self.rows] += T if self.lengths is None else self.lengths


@dataclass
class SamplingParams:
    max_tokens: int = 64
    """New tokens to generate at most."""
    temperature: float = 1.0
    """0 is greedy."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation ends at any of these; the stop token is not returned."""
    seed: int | None = None
    """Seeds this request's own generator: the same seed gives the same tokens in any batch."""

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from logits (V,) under temperature, top-k and top-p."""
    if p.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / p.temperature
    if p.top_k:
        kth = logits.topk(min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if p.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p     # the top token always stays
        probs = probs.scatter(0, order[drop], 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    slot: int = -1
    generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """Runs requests through a model with a shared LatentCache; `step()` advances every request."""

    def __init__(self, model: Transformer, max_batch: int = 8, max_len: int | None = None,
                 dtype: torch.dtype | None = None, max_step_tokens: int | None = None,
                 vocab_size: int | None = None):
        self.model = model.eval()
        # The tokenizer's vocabulary can be smaller than the model's: ids beyond it are never sampled.
        self.vocab_size = vocab_size or model.args.vocab_size
        param = next(model.parameters())
        self.max_len = max_len or model.args.max_seq_len
        self.max_step_tokens = max_step_tokens or self.max_len
        if self.max_step_tokens < max_batch:
            raise ValueError(f"max_step_tokens={self.max_step_tokens} must be >= max_batch={max_batch}: "
                             "every running request decodes one token per step")
        self.cache = LatentCache(model.args, max_batch, self.max_len, dtype or param.dtype, param.device)
        self.free = list(range(max_batch))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, prompt: list[int], params: SamplingParams | None = None) -> Request:
        params = params or SamplingParams()
        if not prompt:
            raise ValueError("prompt is empty: it needs at least one token")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt has {len(prompt)} tokens; the limit is max_len - 1 = {self.max_len - 1}")
        if len(prompt) > self.max_step_tokens:
            raise ValueError(f"prompt has {len(prompt)} tokens; the limit is max_step_tokens = {self.max_step_tokens}")
        if any(not 0 <= t < self.model.args.vocab_size for t in prompt):
            raise ValueError(f"prompt has token ids outside 0..{self.model.args.vocab_size - 1}")
        gen = None
        if params.seed is not None:
            gen = torch.Generator().manual_seed(params.seed)
        req = Request(list(prompt), params, generator=gen)
        self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop `req` now: it leaves the queue, or the batch with its slot freed."""
        if req.done:
            return
        req.finish_reason = "cancelled"
        if req in self.running:
            self.running.remove(req)
            self.free.append(req.slot)
        elif req in self.waiting:
            self.waiting.remove(req)

    @torch.no_grad()
    def step(self) -> list[Request]:
        """Decode one token for every running request, and prefill waiting requests into free slots
        while the step's token budget lasts. Returns the requests that finished in this step; their
        slots are free again.

        Prefills and decodes share one forward (each decode right-padded to the longest prompt)
        when the padded total fits the budget and every running row has room in the cache for the
        padding: on a small model a forward costs about the same for 1 or 200 tokens, so a second
        forward would nearly double the step. Otherwise the admitted requests are prefilled in a
        forward of their own, then everything decodes."""
        decoding = list(self.running)
        admitted = self._admit(self.max_step_tokens - len(decoding))
        if admitted:
            self.cache.reset([r.slot for r in admitted])
            longest = max(len(r.prompt) for r in admitted)
            fused = bool(decoding) and (len(decoding) + len(admitted)) * longest <= self.max_step_tokens and \
                int(self.cache.lens[[r.slot for r in decoding]].max()) + longest <= self.max_len
            for group in ([decoding + admitted] if fused else [admitted, decoding]):
                if group:
                    self._forward(group)
            self.running += admitted
        elif decoding:
            self._forward(decoding)
        finished = [r for r in self.running if r.done]
        for r in finished:
            self.running.remove(r)
            self.free.append(r.slot)
        return finished

    def _forward(self, reqs: list[Request]) -> None:
        """One forward over `reqs` and one new token for each: a just-admitted request feeds its
        prompt, a running one its last token; rows are right-padded to the longest (padding is never
        attended to, and is overwritten by the row's next tokens)."""
        seqs = [r.output[-1:] or r.prompt for r in reqs]  # a running request always has output
        lengths = [len(s) for s in seqs]
        tokens = torch.zeros(len(reqs), max(lengths), dtype=torch.long)  # (B, T)
        for i, s in enumerate(seqs):
            tokens[i, :lengths[i]] = torch.tensor(s)
        self.cache.select([r.slot for r in reqs], lengths)
        logits = self.model(tokens, cache=self.cache, logits_at=torch.tensor(lengths) - 1).logits  # (B, 1, V)
        self._emit_all(reqs, logits[:, 0])

    def _admit(self, budget: int) -> list[Request]:
        """Waiting requests, in arrival order, that get a free slot and whose padded prefill fits
        `budget` tokens (the number of requests times the longest prompt)."""
        admitted: list[Request] = []
        longest = 0
        while self.waiting and len(admitted) < len(self.free):
            n = len(self.waiting[0].prompt)
            if (len(admitted) + 1) * max(longest, n) > budget:
                break
            longest = max(longest, n)
            admitted.append(self.waiting.popleft())
        for r in admitted:
            r.slot = self.free.pop()
        return admitted

    def _emit_all(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """Sample each request's next token from its row of logits (N, V); greedy rows share one argmax."""
        logits = logits[:, :self.vocab_size]
        greedy = logits.argmax(dim=-1).tolist()
        for req, row, best in zip(reqs, logits, greedy):
            self._emit(req, best if req.params.temperature == 0 else sample(row, req.params, req.generator))

    def _emit(self, req: Request, token: int) -> None:
        if token in req.params.stop_token_ids:
            req.finish_reason = "stop"
            return
        req.output.append(token)
        if len(req.output) >= req.params.max_tokens or len(req.prompt) + len(req.output) >= self.max_len:
            req.finish_reason = "length"

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None) -> list[Request]:
        """Run prompts to completion (in batches of the free slots); results in prompt order."""
        reqs = [self.add(p, params) for p in prompts]
        while self.waiting or self.running:
            self.step()
        return reqs
