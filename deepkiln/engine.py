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

import logging
from collections import deque
from dataclasses import dataclass, field

import torch

from deepkiln.model import ModelArgs, Transformer
from deepkiln.sampling import GREEDY_BELOW, MAX_LOGPROBS, SamplingParams  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)


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


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from logits (V,) under temperature, top-k and top-p."""
    if p.greedy:
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


class RequestFailed(ValueError):
    """A failure of one request's own (its sampling parameters made its logits unusable)."""


def adjusted(logits: torch.Tensor, req: Request) -> torch.Tensor:
    """Logits (V,) after the request's penalties and logit bias; RequestFailed when they leave
    nothing finite to sample from."""
    p = req.params
    out = logits.float().clone()
    if req.counts:
        ids = torch.tensor(list(req.counts), dtype=torch.long)
        counts = torch.tensor(list(req.counts.values()), dtype=torch.float32)
        out[ids] -= counts * p.frequency_penalty + p.presence_penalty
    for token, bias in p.logit_bias.items():
        if 0 <= token < out.numel():
            out[token] += bias
    if torch.isnan(out).any() or torch.isposinf(out).any() or not torch.isfinite(out).any():
        raise RequestFailed("the request's logit_bias or penalties leave no finite logit to sample from")
    return out


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    slot: int = -1
    generator: torch.Generator | None = None
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    """Per generated token: its log-probability and the top `params.logprobs` (id, log-probability)."""
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    """Per prompt token (None for the first), when params.prompt_logprobs."""
    counts: dict[int, int] = field(default_factory=dict)
    """Times each token was generated (for the penalties)."""
    error: tuple[str, str] | None = None
    """(kind, message) when finish_reason is "error": kind "invalid_request" (this request's own
    parameters) or "internal" (the forward it was part of failed)."""

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def fail(self, kind: str, message: str) -> None:
        if not self.done:
            self.finish_reason, self.error = "error", (kind, message)


class Engine:
    """Runs requests through a model with a shared LatentCache; `step()` advances every request.
    A failure is contained: a request whose own parameters break its sampling fails alone, a
    failed forward fails the requests in it, and every failed request's slot is free again."""

    def __init__(self, model: Transformer, max_batch: int = 8, max_len: int | None = None,
                 dtype: torch.dtype | None = None, max_step_tokens: int | None = None,
                 vocab_size: int | None = None):
        self.model = model.eval()
        # The tokenizer's vocabulary can be smaller than the model's: ids beyond it are never sampled.
        self.vocab_size = vocab_size or model.args.vocab_size
        param = next(model.parameters())
        self.max_batch = max_batch
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
            gen = torch.Generator().manual_seed(params.seed % 2**64)
        req = Request(list(prompt), params, generator=gen)
        self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop `req` now: it leaves the queue, or the batch with its slot freed."""
        if req.done:
            return
        req.finish_reason = "cancelled"
        if req in self.running:
            self._release(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def abort_all(self, message: str) -> None:
        """Fail every request this engine holds and free every slot: for a step that failed in the
        engine's own bookkeeping, where nothing else is known to be consistent."""
        for r in [*self.running, *self.waiting]:
            r.fail("internal", message)
            r.slot = -1
        self.running, self.waiting, self.free = [], deque(), list(range(self.max_batch))

    def check(self) -> None:
        """The slot invariant: every slot is free or held by exactly one running request, waiting
        requests hold none, and no finished request is still running (AssertionError if broken)."""
        held = [r.slot for r in self.running]
        assert sorted(held + self.free) == list(range(self.max_batch)), (held, self.free)
        assert all(not r.done for r in self.running), [r.finish_reason for r in self.running]
        assert all(r.slot == -1 and not r.done for r in self.waiting)

    @torch.no_grad()
    def step(self) -> list[Request]:
        """Decode one token for every running request, and prefill waiting requests into free slots
        while the step's token budget lasts. Returns the requests that finished in this step (their
        slots are free again), failed ones included with their `error`.

        Prefills and decodes share one forward (each decode right-padded to the longest prompt)
        when the padded total fits the budget and every running row has room in the cache for the
        padding: on a small model a forward costs about the same for 1 or 200 tokens, so a second
        forward would nearly double the step. Otherwise the admitted requests are prefilled in a
        forward of their own, then everything decodes."""
        decoding = list(self.running)
        admitted = self._admit(self.max_step_tokens - len(decoding))
        self.running += admitted  # they hold slots from here on, whatever happens
        if admitted:
            self.cache.reset([r.slot for r in admitted])
            longest = max(len(r.prompt) for r in admitted)
            fused = bool(decoding) and (len(decoding) + len(admitted)) * longest <= self.max_step_tokens and \
                int(self.cache.lens[[r.slot for r in decoding]].max()) + longest <= self.max_len
            groups = [decoding + admitted] if fused else [admitted, decoding]
        else:
            groups = [decoding]
        for group in groups:
            if group:
                self._forward(group)
        finished = [r for r in self.running if r.done]
        for r in finished:
            self._release(r)
        return finished

    def _release(self, req: Request) -> None:
        self.running.remove(req)
        self.free.append(req.slot)
        req.slot = -1

    def _forward(self, reqs: list[Request]) -> None:
        """One forward over `reqs` and one new token for each: a just-admitted request feeds its
        prompt, a running one its last token; rows are right-padded to the longest (padding is never
        attended to, and is overwritten by the row's next tokens). If the forward fails, every
        request in it fails; the others are untouched."""
        seqs = [r.output[-1:] or r.prompt for r in reqs]  # a running request always has output
        lengths = [len(s) for s in seqs]
        tokens = torch.zeros(len(reqs), max(lengths), dtype=torch.long)  # (B, T)
        for i, s in enumerate(seqs):
            tokens[i, :lengths[i]] = torch.tensor(s)
        try:
            self.cache.select([r.slot for r in reqs], lengths)
            logits = self.model(tokens, cache=self.cache, logits_at=torch.tensor(lengths) - 1).logits  # (B, 1, V)
        except Exception as e:  # logged with its traceback; the requests get no internals
            logger.exception("a forward of %d requests failed; they fail, the others go on", len(reqs))
            for r in reqs:
                r.fail("internal", f"the model's forward failed ({type(e).__name__})")
            return
        for r in reqs:
            if r.params.prompt_logprobs and r.prompt_logprobs is None:
                self._prompt_logprobs(r)
        self._emit_all(reqs, logits[:, 0])

    def _prompt_logprobs(self, req: Request) -> None:
        """The prompt tokens' log-probabilities, from a forward of the prompt alone (no cache)."""
        try:
            lp = self.model(torch.tensor([req.prompt])).logits[0, :-1, :self.vocab_size].float().log_softmax(-1)
            req.prompt_logprobs = [None] + [_logprob_entry(row, t, req.params.logprobs or 0)
                                            for row, t in zip(lp, req.prompt[1:])]
        except Exception as e:
            logger.exception("the prompt log-probabilities of a request failed")
            req.fail("internal", f"the prompt's log-probabilities failed ({type(e).__name__})")

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
        """Sample each request's next token from its row of logits (N, V). Greedy rows without
        penalties or bias share one argmax; a row the forward made non-finite fails its request,
        and so does a request whose own parameters break its sampling."""
        logits = logits[:, :self.vocab_size]
        greedy = logits.argmax(dim=-1).tolist()
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        logprobs = logits.float().log_softmax(dim=-1) if any(r.params.logprobs is not None for r in reqs) else None
        for i, req in enumerate(reqs):
            if req.done:  # failed while its prompt's log-probabilities were computed
                continue
            if not finite[i]:
                req.fail("internal", "the model produced non-finite logits")
                continue
            p = req.params
            try:
                row = adjusted(logits[i], req) if p.adjusts_logits else logits[i]
                if p.greedy:
                    token = int(row.argmax()) if p.adjusts_logits else greedy[i]
                else:
                    token = sample(row, p, req.generator)
            except RequestFailed as e:
                req.fail("invalid_request", str(e))
                continue
            except RuntimeError as e:  # torch refusing this request's distribution
                req.fail("invalid_request", f"sampling failed for this request's parameters: {e}")
                continue
            if logprobs is not None and p.logprobs is not None:
                req.logprobs.append(_logprob_entry(logprobs[i], token, p.logprobs))
            self._emit(req, token)

    def _emit(self, req: Request, token: int) -> None:
        if token in req.params.stop_token_ids:
            req.finish_reason = "stop"
            return
        req.output.append(token)
        req.counts[token] = req.counts.get(token, 0) + 1
        if len(req.output) >= req.params.max_tokens or len(req.prompt) + len(req.output) >= self.max_len:
            req.finish_reason = "length"

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None) -> list[Request]:
        """Run prompts to completion (in batches of the free slots); results in prompt order."""
        reqs = [self.add(p, params) for p in prompts]
        while self.waiting or self.running:
            self.step()
        return reqs


def _logprob_entry(row: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """(log-probability of `token`, the `top` most likely (id, log-probability)) from a row (V,) of log-probabilities."""
    alternatives = []
    if top:
        values, ids = row.topk(min(top, row.numel()))
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return float(row[token]), alternatives

