import pytest
import torch

from deepkiln.engine import Engine, LatentCache, SamplingParams, sample
from deepkiln.model import PRESETS, Transformer

TINY = PRESETS["tiny"]


@pytest.fixture
def model():
    return Transformer(TINY.model_copy(update={"init_std": 0.05})).eval()


@pytest.mark.parametrize("absorb", [True, False])
def test_incremental_decode_matches_full_forward_for_ragged_batch(model, absorb):
    # fp32; tolerance 1e-5 of the logit scale (observed differences are ~1e-7).
    seqs = [torch.randint(0, TINY.vocab_size, (n,)) for n in (11, 7, 15)]
    prompt_lens = [4, 2, 6]
    full = [model(s[None])[0][0] for s in seqs]
    cache = LatentCache(model.args, max_batch=4, max_len=32)
    got = [[] for _ in seqs]
    with torch.no_grad():
        for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
            cache.select([i + 1])  # slots need not start at 0
            got[i].append(model(s[None, :p], cache=cache, absorb=absorb)[0][0])
        for t in range(min(prompt_lens), max(len(s) for s in seqs)):
            rows = [i for i, (s, p) in enumerate(zip(seqs, prompt_lens)) if p <= t < len(s)]
            cache.select([i + 1 for i in rows])
            logits = model(torch.stack([seqs[i][t:t + 1] for i in rows]), cache=cache, absorb=absorb).logits
            for j, i in enumerate(rows):
                got[i].append(logits[j])
    for i in range(len(seqs)):
        scale = full[i].abs().max().item()
        torch.testing.assert_close(torch.cat(got[i]), full[i], rtol=0, atol=1e-5 * scale)
    assert cache.lens.tolist() == [0, 11, 7, 15]


def test_cache_holds_only_latent_and_rope_key():
    args = PRESETS["small"]
    cache = LatentCache(args, max_batch=2, max_len=16, dtype=torch.bfloat16)
    per_token = args.n_layers * (args.kv_lora_rank + args.qk_rope_head_dim)
    assert cache.values_per_token() == per_token
    total = cache.kv.numel() + cache.pe.numel()
    assert total == 2 * 16 * per_token
    assert cache.bytes_per_token() == per_token * 2


def greedy_reference(model, prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(model(torch.tensor([tokens]))[0][0, -1].argmax()))
    return tokens[len(prompt):]


def test_greedy_generation_matches_full_forward_argmax(model):
    prompts = [[5, 6, 7], [100, 200, 300, 400, 500], [42]]
    engine = Engine(model, max_batch=2, max_len=64)   # fewer slots than prompts: one waits
    reqs = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0))
    for req, prompt in zip(reqs, prompts):
        assert req.output == greedy_reference(model, prompt, 8)
        assert req.finish_reason == "length"
    assert sorted(engine.free) == [0, 1]


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=200, top_p=0.95, seed=7)
    alone = Engine(model, max_batch=4, max_len=64).generate([[1, 2, 3]], params)[0].output
    crowd = Engine(model, max_batch=4, max_len=64).generate(
        [[9, 9], [1, 2, 3], [4, 4, 4, 4]], params)[1].output
    other = Engine(model, max_batch=4, max_len=64).generate(
        [[1, 2, 3]], SamplingParams(max_tokens=12, temperature=1.0, top_k=200, top_p=0.95, seed=8))[0].output
    assert alone == crowd
    assert alone != other


def test_stop_token_ends_generation_and_is_not_returned(model):
    expected = greedy_reference(model, [3, 1, 4], 6)
    stop = expected[3]
    first = expected.index(stop)
    req = Engine(model, max_len=64).generate(
        [[3, 1, 4]], SamplingParams(max_tokens=6, temperature=0, stop_token_ids=(stop,)))[0]
    assert req.output == expected[:first] and req.finish_reason == "stop"


def test_generation_stops_at_cache_length(model):
    req = Engine(model, max_len=10).generate([[1, 2, 3, 4]], SamplingParams(max_tokens=50, temperature=0))[0]
    assert req.finish_reason == "length" and len(req.prompt) + len(req.output) == 10


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(500)
    best = int(logits.argmax())
    gen = torch.Generator().manual_seed(0)
    assert all(sample(logits, SamplingParams(top_k=1), gen) == best for _ in range(20))
    assert all(sample(logits, SamplingParams(top_p=1e-6), gen) == best for _ in range(20))


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"max_tokens": 0}, "max_tokens")])
def test_bad_sampling_params_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_are_refused(model):
    engine = Engine(model, max_len=8)
    with pytest.raises(ValueError, match="empty"):
        engine.add([])
    with pytest.raises(ValueError, match="limit is max_len - 1 = 7"):
        engine.add(list(range(8)))
    with pytest.raises(ValueError, match="outside"):
        engine.add([TINY.vocab_size])


def test_continuous_batching_short_request_finishes_first_with_its_solo_output(model):
    greedy = SamplingParams(max_tokens=24, temperature=0)
    short_params = SamplingParams(max_tokens=4, temperature=0)
    long_alone = Engine(model, max_batch=2, max_len=64).generate([[9, 8, 7, 6, 5]], greedy)[0].output
    short_alone = Engine(model, max_batch=2, max_len=64).generate([[11, 12]], short_params)[0].output
    engine = Engine(model, max_batch=2, max_len=64)
    long, short = engine.add([9, 8, 7, 6, 5], greedy), engine.add([11, 12], short_params)
    finished = []
    while engine.waiting or engine.running:
        finished += engine.step()
    assert finished == [short, long]
    assert long.output == long_alone and short.output == short_alone
    # A request joining a running batch mid-way decodes as it would alone, too.
    engine = Engine(model, max_batch=2, max_len=64)
    long = engine.add([9, 8, 7, 6, 5], greedy)
    for _ in range(5):
        engine.step()
    late = engine.add([11, 12], short_params)
    while engine.running or engine.waiting:
        engine.step()
    assert long.output == long_alone and late.output == short_alone


def test_token_budget_bounds_each_step_and_cancel_frees_the_slot(model):
    engine = Engine(model, max_batch=3, max_len=64, max_step_tokens=10)
    params = SamplingParams(max_tokens=20, temperature=0)
    a, b, c = (engine.add(list(range(1, 7)), params) for _ in range(3))  # 6 prompt tokens each
    engine.step()
    assert engine.running == [a] and list(engine.waiting) == [b, c]  # 6 + 6 > 10: b waits
    engine.step()
    assert engine.running == [a, b]                                   # 1 decode + 6 <= 10
    engine.cancel(a)
    assert a.finish_reason == "cancelled" and a not in engine.running and len(engine.free) == 2
    engine.cancel(c)
    assert not engine.waiting
    with pytest.raises(ValueError, match="max_step_tokens = 10"):
        engine.add(list(range(1, 12)), params)
    with pytest.raises(ValueError, match="max_batch=3"):
        Engine(model, max_batch=3, max_step_tokens=2)


def test_ids_beyond_the_tokenizer_vocabulary_are_never_sampled(model):
    prompts = [[5, 6, 7], [100, 200], [42]]
    params = [SamplingParams(max_tokens=16, temperature=0), SamplingParams(max_tokens=16, temperature=1.5, seed=1)]
    free = [r.output for p in params for r in Engine(model, max_batch=3, max_len=64).generate(prompts, p)]
    assert max(max(o) for o in free) >= 100  # this random model does pick ids beyond 100 ...
    limited = [r.output for p in params
               for r in Engine(model, max_batch=3, max_len=64, vocab_size=100).generate(prompts, p)]
    assert max(max(o) for o in limited) < 100  # ... unless its tokenizer only knows 100


def _count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_admissions_share_the_running_batch_forward_and_decode_as_alone(model):
    params = SamplingParams(max_tokens=12, temperature=0)
    prompts = [[9, 8, 7, 6, 5], [11, 12], [3, 4, 5, 6, 7, 8, 9], [20]]
    alone = [Engine(model, max_batch=1, max_len=64).generate([p], params)[0].output for p in prompts]
    engine = Engine(model, max_batch=4, max_len=64)
    calls = _count_forwards(model)
    reqs = [engine.add(prompts[0], params)]
    engine.step()
    for p in prompts[1:]:  # each joins a running batch: one forward for its prefill and the decodes
        reqs.append(engine.add(p, params))
        calls[0] = 0
        engine.step()
        assert calls[0] == 1 and reqs[-1] in engine.running
    while engine.running:
        engine.step()
    assert [r.output for r in reqs] == alone


def test_a_padded_step_over_the_budget_or_the_cache_prefills_apart(model):
    params = SamplingParams(max_tokens=30, temperature=0)
    long_prompt = list(range(1, 9))
    alone = [Engine(model, max_batch=1, max_len=64).generate([p], params)[0].output for p in ([5, 6], long_prompt)]
    # Over the budget: 2 rows x 8 tokens > 12 = max_step_tokens, though 1 decode + 8 fits.
    engine = Engine(model, max_batch=2, max_len=64, max_step_tokens=12)
    calls = _count_forwards(model)
    first = engine.add([5, 6], params)
    engine.step()
    second = engine.add(long_prompt, params)
    calls[0] = 0
    engine.step()
    assert calls[0] == 2 and second in engine.running
    while engine.running:
        engine.step()
    assert [first.output, second.output] == alone
    # No room in the cache for a running row's padding: 29 cached + 8 > max_len = 36.
    engine = Engine(model, max_batch=2, max_len=36)
    first = engine.add([5, 6], params)
    for _ in range(28):
        engine.step()
    second = engine.add(long_prompt, params)
    calls[0] = 0
    engine.step()
    assert calls[0] == 2 and first.output == alone[0][:len(first.output)]


# -- failure isolation ------------------------------------------------------------------------------

NORMAL = [[5, 6, 7], [100, 200, 300, 400, 500], [42], [9, 8, 7, 6], [11, 12], [3, 1, 4, 1, 5], [20, 21]]


def solo_outputs(model, params):
    return [Engine(model, max_batch=1, max_len=64).generate([p], params)[0].output for p in NORMAL]


def run_all(engine):
    while engine.waiting or engine.running:
        engine.step()
        engine.check()


@pytest.mark.parametrize("bad", [SamplingParams(max_tokens=10, temperature=1e-40),
                                 SamplingParams(max_tokens=10, temperature=0, logit_bias={7: float("nan")}),
                                 SamplingParams(max_tokens=10, temperature=0.7, logit_bias={7: float("inf")})])
def test_a_bad_request_next_to_seven_normal_ones_fails_alone_or_is_greedy(model, bad):
    params = SamplingParams(max_tokens=10, temperature=0)
    expected = solo_outputs(model, params)
    engine = Engine(model, max_batch=8, max_len=64)
    reqs = [engine.add(p, params) for p in NORMAL[:3]] + [engine.add([1, 2, 3], bad)] + \
        [engine.add(p, params) for p in NORMAL[3:]]
    run_all(engine)
    normal = reqs[:3] + reqs[4:]
    assert [r.output for r in normal] == expected and all(r.finish_reason == "length" for r in normal)
    odd = reqs[3]
    if bad.temperature == 1e-40:  # below GREEDY_BELOW: greedy, as vLLM does
        assert odd.finish_reason == "length" and odd.output == greedy_reference(model, [1, 2, 3], 10)
    else:
        assert odd.finish_reason == "error" and odd.error[0] == "invalid_request" and odd.output == []
        assert "logit_bias" in odd.error[1]
    # Every slot came back: max_batch requests run at once again.
    again = [engine.add(p, params) for p in NORMAL + [[1]]]
    engine.step()
    assert len(engine.running) == 8 and not engine.waiting
    run_all(engine)
    assert [r.output for r in again[:7]] == expected


def test_a_failed_forward_fails_only_its_requests_and_frees_their_slots(model, monkeypatch):
    params = SamplingParams(max_tokens=6, temperature=0)
    expected = solo_outputs(model, params)
    engine = Engine(model, max_batch=8, max_len=64, max_step_tokens=12)
    running = [engine.add(p, params) for p in NORMAL[:2]]
    engine.step()  # these two decode from here on
    forward = model.forward
    poison = 4095  # prompt id that breaks the forward it is in; the running rows decode apart
    monkeypatch.setattr(model, "forward", lambda tokens, *a, **kw: (_ for _ in ()).throw(RuntimeError("boom"))
                        if (tokens == poison).any() else forward(tokens, *a, **kw))
    doomed = engine.add([poison] * 8, params)  # 3 rows x 8 > 12: prefilled in a forward of its own
    finished = engine.step()
    engine.check()
    assert finished == [doomed] and doomed.error == ("internal", "the model's forward failed (RuntimeError)")
    run_all(engine)
    assert [r.output for r in running] == expected[:2]
    assert sorted(engine.free) == list(range(8))


def test_the_slot_invariant_holds_through_a_random_schedule(model, monkeypatch):
    import random

    rng = random.Random(0)
    forward = model.forward
    broken = {"on": False}
    monkeypatch.setattr(model, "forward", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("injected"))
                        if broken["on"] else forward(*a, **kw))
    engine = Engine(model, max_batch=4, max_len=48, max_step_tokens=24)
    live, outcomes = [], set()
    for _ in range(150):
        action = rng.random()
        if action < 0.35:
            bias = {3: float("nan")} if rng.random() < 0.15 else {}
            live.append(engine.add([rng.randrange(1, 4000) for _ in range(rng.randint(1, 10))],
                                   SamplingParams(max_tokens=rng.randint(1, 12), temperature=rng.choice([0, 1e-30, 0.8]),
                                                  seed=rng.randrange(100), logit_bias=bias)))
        elif action < 0.45 and live:
            engine.cancel(rng.choice(live))
        broken["on"] = rng.random() < 0.1
        engine.step()
        engine.check()
        outcomes |= {r.finish_reason for r in live if r.done}
        live = [r for r in live if not r.done]
    broken["on"] = False
    run_all(engine)
    assert outcomes >= {"length", "cancelled", "error"} and sorted(engine.free) == [0, 1, 2, 3]


# -- OpenAI's sampling parameters -----------------------------------------------------------------

def test_penalties_change_greedy_output_on_a_repeating_prompt_and_logit_bias_bans_or_forces(model):
    prompt = [7, 8, 9] * 6
    plain = Engine(model, max_len=64).generate([prompt], SamplingParams(max_tokens=16, temperature=0))[0].output
    assert len(set(plain)) < len(plain)  # this random model repeats itself
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalised = Engine(model, max_len=64).generate([prompt], SamplingParams(max_tokens=16, temperature=0, **kw))[0]
        assert penalised.output != plain and len(set(penalised.output)) > len(set(plain)), kw
    banned = plain[0]
    out = Engine(model, max_len=64).generate([prompt], SamplingParams(max_tokens=16, temperature=0,
                                                                      logit_bias={banned: -100}))[0].output
    assert banned not in out
    forced = Engine(model, max_len=64).generate([prompt], SamplingParams(max_tokens=5, temperature=0.9, seed=1,
                                                                         logit_bias={77: 100}))[0].output
    assert forced == [77] * 5


def test_logprobs_are_the_full_forward_log_softmax_with_sorted_alternatives(model):
    prompt = [5, 6, 7, 8]
    req = Engine(model, max_len=64).generate([prompt], SamplingParams(max_tokens=5, temperature=0.8, seed=3,
                                                                      logprobs=3, prompt_logprobs=True))[0]
    full = model(torch.tensor([prompt + req.output]))[0][0].float().log_softmax(-1)  # (T, V)
    assert len(req.logprobs) == len(req.output) == 5
    for i, (token, (lp, top)) in enumerate(zip(req.output, req.logprobs)):
        row = full[len(prompt) - 1 + i]
        assert lp == pytest.approx(row[token].item(), abs=1e-4)
        assert [t for t, _ in top] == row.topk(3).indices.tolist()
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert req.prompt_logprobs[0] is None and len(req.prompt_logprobs) == len(prompt)
    for i, (lp, top) in enumerate(req.prompt_logprobs[1:]):
        assert lp == pytest.approx(full[i, prompt[i + 1]].item(), abs=1e-4) and len(top) == 3
    with pytest.raises(ValueError, match="logprobs=21 must be in 0..20"):
        SamplingParams(logprobs=21)
