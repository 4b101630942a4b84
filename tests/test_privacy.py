import copy

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch.utils.data import TensorDataset

from deepkiln.config import Config, LoraArgs, PrivacyArgs, load_config
from deepkiln.lora import LoraLinear
from deepkiln.model import MoE, Transformer
from deepkiln.privacy import apply_dp, dp_backward, dp_trainable, epsilon_of, lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny() -> Transformer:
    torch.manual_seed(0)
    return Transformer(Config().model.model_copy(update={"vocab_size": 512}))


def dataset(n: int, T: int = 12) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(8, 512, (n, T + 1), generator=g)
    y = ids[:, 1:].clone()
    y[: n // 2, T - 3:] = -100  # some examples shorter than others
    return TensorDataset(ids[:, :-1], y)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def test_moe_layers_would_give_per_token_gradients_so_they_stay_frozen():
    # Opacus' validator accepts the whole model (no trainable layer owns a buffer), but the MoE
    # layers run on the batch flattened into tokens: their "per-sample" gradients have B*T rows.
    model = tiny()
    assert ModuleValidator.validate(model, strict=False) == []
    x, y = dataset(4).tensors
    lm_loss(GradSampleModule(model, strict=True), x, y).backward()
    router = next(m for m in model.modules() if isinstance(m, MoE)).gate.proj.weight
    assert router.grad_sample.shape[0] == 4 * 12

    for params in ("full", "lora"):
        model = tiny()
        trainable = dp_trainable(model, params, LoraArgs(rank=4))
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {id(p) for p in trainable} == {id(p) for p in model.parameters() if p.requires_grad}
        assert names and not any(".ffn.experts." in n or ".ffn.gate." in n or ".ffn.shared." in n
                                 or n.startswith("mtp.") for n in names), names
        if params == "lora":
            assert all("lora_" in n for n in names)
            assert any(isinstance(m, LoraLinear) for m in model.layers[0].ffn.modules())  # the dense MLP
        else:
            assert {"embed.weight", "head.weight", "layers.1.attn.wkv_b.weight", "layers.0.ffn.w1.weight"} <= names
        GradSampleModule(model, strict=True)  # the strict validator passes


@pytest.mark.parametrize("params", ["full", "lora"])
def test_per_sample_gradients_are_each_examples_own_and_clipped_before_noise(params):
    clip = 0.05
    model = tiny()
    trainable = dp_trainable(model, params, LoraArgs(rank=4))
    if params == "lora":  # B starts at zero; move it so every adapter has a gradient through A too
        with torch.no_grad():
            for p in trainable:
                p.normal_(0, 0.05)
    reference = copy.deepcopy(model)
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    data = dataset(8)
    dp = apply_dp(model, torch.optim.SGD(trainable, lr=0.1), data,
                  PrivacyArgs(max_grad_norm=clip, noise_multiplier=1.0, delta=1e-2, noise_seed=0))
    x, y = data.tensors

    # Opacus' per-sample gradient of example i is the gradient of example i's loss alone.
    dp_backward(dp.module, x[:4], y[:4])
    per_sample = torch.cat([p.grad_sample.reshape(4, -1) for p in trainable], dim=1)
    for i in range(4):
        alone = flat(torch.autograd.grad(lm_loss(reference, x[i:i + 1], y[i:i + 1]), ref_params))
        torch.testing.assert_close(per_sample[i], alone, rtol=1e-4, atol=1e-6)
    dp.optimizer.zero_grad()

    # Clipping (DPOptimizer.clip_and_accumulate, the step before add_noise): each example's
    # gradient comes out with norm <= clip, in its own direction.
    raw_norms = []
    for i in range(8):
        dp_backward(dp.module, x[i:i + 1], y[i:i + 1])
        raw = flat(p.grad_sample[0] for p in trainable)
        dp.optimizer.clip_and_accumulate()
        clipped = flat(p.summed_grad for p in trainable)
        raw_norms.append(raw.norm().item())
        assert clipped.norm().item() <= clip * (1 + 1e-4)
        torch.testing.assert_close(clipped, raw * min(1.0, clip / raw.norm().item()), rtol=1e-4, atol=1e-8)
        dp.optimizer.zero_grad()
    assert min(raw_norms) > clip, raw_norms  # every example was really clipped

    # A whole batch: the sum of clipped gradients is bounded by B x clip; then the noise
    # (std noise_multiplier x clip per coordinate) is added on top.
    dp_backward(dp.module, x, y)
    dp.optimizer.clip_and_accumulate()
    summed = flat(p.summed_grad for p in trainable)
    assert summed.norm().item() <= 8 * clip * (1 + 1e-4)
    dp.optimizer.add_noise()
    noise = flat(p.grad for p in trainable) - summed
    assert abs(noise.std().item() / (1.0 * clip) - 1) < 0.1


def test_fine_tune_reaches_the_target_epsilon_and_an_empty_batch_is_a_step():
    args = PrivacyArgs(target_epsilon=2.0, delta=1e-3, epochs=2, batch_size=8, accountant="rdp", noise_seed=0)
    model = tiny()
    params = dp_trainable(model, "lora", LoraArgs(rank=4))
    dp = apply_dp(model, torch.optim.AdamW(params, lr=1e-2), dataset(64, T=8), args)
    assert dp.sample_rate == 8 / 64 and dp.planned_steps == 16
    losses, sizes = [], []
    while dp.steps < dp.planned_steps:
        for x, y in dp.loader:
            losses.append(dp_backward(dp.module, x, y))
            sizes.append(len(x))
            dp.optimizer.step()
            dp.optimizer.zero_grad()
    assert dp.steps == 16 and len(sizes) == 16 and 0 < sum(sizes) / 16 < 16  # Poisson: sizes vary
    assert len(set(sizes)) > 1
    assert dp.epsilon() == pytest.approx(2.0, abs=0.05) and dp.epsilon() <= 2.0
    assert dp.steps_within_budget(5) == 0  # the plan spent the budget

    # Poisson sampling can draw an empty batch: it still adds noise and counts.
    empty = torch.zeros(0, 8, dtype=torch.long)
    before = [p.detach().clone() for p in params]
    assert dp_backward(dp.module, empty, empty) is None
    dp.optimizer.step()
    assert dp.steps == 17 and dp.epsilon() > 2.0
    assert all(not torch.equal(a, p) for a, p in zip(before, params))  # noise moved the weights


def test_budget_search_stops_before_the_step_that_would_exceed_it():
    args = PrivacyArgs(target_epsilon=3.0, delta=1e-3, noise_multiplier=1.0, batch_size=8, accountant="rdp")
    model = tiny()
    dp = apply_dp(model, torch.optim.SGD(dp_trainable(model, "lora", LoraArgs(rank=2)), lr=0.1), dataset(64), args)
    k = dp.steps_within_budget(1000)
    assert 0 < k < 1000
    eps = [epsilon_of([(1.0, 1 / 8, n)], 1e-3, "rdp") for n in (k, k + 1)]
    assert eps[0] <= 3.0 < eps[1]


def test_bad_privacy_input_is_a_clear_error():
    model = tiny()
    opt = torch.optim.SGD(dp_trainable(model, "lora", LoraArgs(rank=2)), lr=0.1)
    with pytest.raises(ValueError, match=r"privacy\.delta=0\.02 must be below 1/N = 0\.0156 \(N = 64 private"):
        apply_dp(model, opt, dataset(64), PrivacyArgs(delta=0.02))
    with pytest.raises(ValueError, match=r"privacy\.enabled=True needs train\.zero_stage=0 \(got 2\)"):
        load_config(["--privacy.enabled=true", "--train.zero_stage=2"])
    for arg, message in [("--privacy.delta=1.5", r"privacy\.delta=1\.5 must be < 1"),
                         ("--privacy.max_grad_norm=0", r"privacy\.max_grad_norm=0 must be > 0"),
                         ("--privacy.noise_multiplier=-1", r"privacy\.noise_multiplier=-1 must be >= 0"),
                         ("--privacy.accountant=gdp", r"privacy\.accountant")]:
        with pytest.raises(ValueError, match=message):
            load_config([arg])
