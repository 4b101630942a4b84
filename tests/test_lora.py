import pytest
import torch
from torch import nn

from deepkiln.config import LoraArgs
from deepkiln.lora import LoraLinear, apply_lora, lora_parameters, merge_lora
from deepkiln.model import PRESETS, Transformer, lm_losses


@pytest.fixture
def model():
    return Transformer(PRESETS["tiny"].model_copy(update={"init_std": 0.05}))


def test_adapted_model_starts_equal_trains_only_adapters_and_merges_to_the_same_function(model):
    tokens = torch.randint(0, 4096, (2, 16))
    before = model(tokens)[0]
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    names = apply_lora(model, LoraArgs(rank=4))
    assert names and all(isinstance(model.get_submodule(n), LoraLinear) for n in names)
    assert not any("wkv_b" in n or n.endswith("gate.proj") or n == "head" for n in names)
    torch.testing.assert_close(model(tokens)[0], before)  # B = 0: same function
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(model)}

    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(20):
        loss = lm_losses(model(tokens[:, :-1], mtp=True), tokens[:, 1:], model.args)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
    adapted = model(tokens)[0].detach()
    assert not torch.allclose(adapted, before)
    base = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k], v) for k, v in frozen.items())  # the base weights never moved

    merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert set(model.state_dict()) == set(frozen)  # a plain checkpoint again
    torch.testing.assert_close(model(tokens)[0], adapted, rtol=1e-4, atol=1e-4)
    assert all(p.requires_grad for p in model.parameters())


def test_no_matching_layer_is_a_clear_error(model):
    with pytest.raises(ValueError, match=r"lora\.targets=\['nope'\]"):
        apply_lora(model, LoraArgs(targets=["nope"]))


def test_lora_layers_are_stock_linear_for_opacus():
    layer = LoraLinear(nn.Linear(8, 4), rank=2, alpha=4)
    assert isinstance(layer.lora_a, nn.Linear) and isinstance(layer.lora_b, nn.Linear)
    assert not list(layer.parameters(recurse=False)) and not list(layer.buffers())
