"""deepkiln and the DeepSeek ecosystem: exported folders load in transformers with deepkiln's logits,
generations and token ids; the mapping is exact for every router and rope variant; MTP matches
transformers' MtpModel; the published presets keep the published names and shapes; ONNX and
torch.export graphs match PyTorch at other shapes.

Weights for the sharp comparisons have O(1) activations (norm weights 1+0.2N, linears N(0, 1/fan_in),
embeddings N(0, 1), balancing bias 0.3N): at init scale a wrong mapping still looks right.
"""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from deepkiln.engine import Engine, SamplingParams
from deepkiln.hf import hf_shapes, load_hf_model, write_hf_weights
from deepkiln.hf_config import hf_config
from deepkiln.model import PRESETS, Gate, Transformer
from deepkiln.preferences import encode_answer
from deepkiln.testing import hf_folder, meta_model
from deepkiln.tokenizer import EOS_ID, SPECIAL_TOKENS
from pipelines import export

transformers = pytest.importorskip("transformers")

TINY = PRESETS["tiny"]
END = [EOS_ID, SPECIAL_TOKENS["<|end|>"]]
PROBES = ["The river runs east.", "中文文本，测试一下。北京欢迎你！", "def f(x):\n    return x + 1  # code\n",
          "tabs\tand  double  spaces", "emoji 🎉 and 数字 12345, 3.14", "mixed中英文text", " ", "\n\n", ""]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好 there"},
        {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "code: x = 1"}]


def o1(model: Transformer) -> Transformer:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.startswith("embed"):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
        for gate in (m for m in model.modules() if isinstance(m, Gate)):
            if model.args.score_func == "sigmoid":
                gate.bias.copy_(0.3 * torch.randn(gate.bias.shape, generator=gen))
    return model.eval()


def load_hf(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    return model.eval()


VARIANTS = {
    "v3-tiny": {},
    "v3-yarn": {"max_seq_len": 640, "original_seq_len": 16, "rope_factor": 40.0, "mscale": 0.707, "route_scale": 2.5},
    "v2-groups": {"score_func": "softmax", "q_lora_rank": 0, "n_mtp_layers": 0, "route_scale": 1.5},
    "v2-greedy": {"score_func": "softmax", "n_expert_groups": 1, "n_limited_groups": 1, "n_mtp_layers": 0,
                  "n_dense_layers": 0},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_mapping_is_exact_for_every_router_and_rope_variant(variant, tmp_path):
    ours = o1(Transformer(TINY.model_copy(update=VARIANTS[variant])))
    folder = hf_folder(ours, tmp_path / variant)
    theirs = load_hf(folder)
    assert type(theirs).__name__ == ("DeepseekV3ForCausalLM" if variant.startswith("v3") else "DeepseekV2ForCausalLM")
    x = torch.randint(0, TINY.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ours(x).logits, theirs(x).logits
        assert a.abs().mean() > 0.3  # O(1) logits: a wrong rope, router or norm would show here
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        back = load_hf_model(folder).eval()  # and back: the same tensors, bit for bit
        assert torch.equal(back(x).logits, a)
    if ours.args.n_mtp_layers:
        mtp_equals_transformers_mtp(ours, theirs, x)


def test_sharded_bf16_folders_load_shard_by_shard(tmp_path):
    """Weights split over numbered files with an index, in bf16 (routers fp32, as transformers keeps
    them), read back tensor by tensor into an fp32 model (routers exact, the rest the bf16-rounded
    values) or a bf16 one (the balancing bias stays fp32 and exact)."""
    ours = o1(Transformer(TINY))
    files = write_hf_weights(ours, tmp_path, torch.bfloat16, shard_bytes=60_000)
    assert len(files) > 3 and files[-1] == "model.safetensors.index.json"
    (tmp_path / "config.json").write_text(json.dumps(hf_config(TINY, bos_id=2, eos_id=END)))
    for dtype in (torch.bfloat16, None):
        back = load_hf_model(tmp_path, dtype)
        for name, t in ours.state_dict().items():
            got = back.state_dict()[name]
            exact = name.endswith("gate.bias") or (dtype is None and ".gate." in name)
            assert got.dtype == (torch.float32 if dtype is None or name.endswith("gate.bias") else dtype), name
            assert torch.equal(got.float(), t if exact else t.bfloat16().float()), name


def mtp_equals_transformers_mtp(ours: Transformer, theirs, x):
    """transformers' MtpModel (the generic MTP layer its MTP speculative decoding uses), loaded from the
    exported folder, on the main model's last hidden state (after its final norm, as vLLM's drafter
    feeds it), gives deepkiln's MTP logits."""
    from transformers.modeling_layers import MtpModel

    # transformers looks for V3's MTP weights at layer 61 only; this folder's are at n_layers.
    theirs._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{ours.args.n_layers}\..*"]
    mtp = MtpModel.from_pretrained(theirs).eval()
    with torch.no_grad():
        hidden = theirs.model(x).last_hidden_state
        positions = torch.arange(x.shape[1] - 1).expand(x.shape[0], -1)
        drafted = mtp._project_to_logits(mtp.forward_layer(0, hidden[:, :-1], positions, None, input_ids=x[:, 1:]))
        expected = ours(x, mtp=True).mtp_logits
    assert expected.abs().mean() > 0.3
    torch.testing.assert_close(drafted, expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_export_hf_of_a_trained_run_loads_in_transformers_with_its_logits_generations_and_ids(served_run, tmp_path):
    out = tmp_path / "exported"
    report = export.main([*served_run["argv"], "--format", "hf", "--out", str(out)])
    assert report["architecture"] == "DeepseekV3ForCausalLM" and report["step"] > 0
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("scoring_func", "topk_method", "rope_interleave", "first_k_dense_replace",
                                   "num_nextn_predict_layers", "tie_word_embeddings", "norm_topk_prob")} == {
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "rope_interleave": True, "first_k_dense_replace": 1,
        "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "norm_topk_prob": True}
    assert "rope_scaling" not in config  # YaRN is off at the tiny preset's 256 tokens
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == END
    card = (out / "README.md").read_text()
    assert f"{report['step']} steps" in card and "DeepseekV3ForCausalLM" in card

    ours = export.source_model(export.load_config(served_run["argv"]))[0].eval()
    theirs = load_hf(str(out))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for shape in ((2, 17), (1, 64)):
            x = torch.randint(0, ours.args.vocab_size, shape, generator=gen)
            torch.testing.assert_close(theirs(x).logits, ours(x).logits, rtol=0, atol=1e-4)

    tok, hf_tok = served_run["tokenizer"], transformers.AutoTokenizer.from_pretrained(out)
    for text in PROBES:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text
        assert hf_tok(text)["input_ids"] == tok.encode_prompt(text), text
        assert hf_tok.decode(tok.encode(text)) == text
    rendered = hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert rendered["input_ids"] == tok.apply_chat_template(CHAT)
    assert [hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id] == [2, EOS_ID, 0]

    # Greedy generation: transformers' generate and deepkiln's engine pick the same tokens.
    prompts = [tok.encode_prompt(p) for p in ("The river", "People of the", "中文")] + [tok.apply_chat_template(CHAT)]
    engine = Engine(ours, max_batch=4, max_len=128)
    done = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=tuple(END)))
    for prompt, req in zip(prompts, done):
        with torch.no_grad():
            out_ids = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
        assert req.output and out_ids.tolist()[:len(req.output)] == req.output, (prompt, out_ids.tolist(), req.output)


def published(name: str) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of a published checkpoint, from transformers' own model of its
    config on the meta device (experts, fused in memory there, one per expert as published), plus the
    MTP layer, which transformers' main model does not build."""
    args = PRESETS[name]
    config = transformers.AutoConfig.for_model(**hf_config(args, bos_id=0, eos_id=1))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    shapes = {}
    for key, t in model.state_dict().items():
        if ".mlp.experts.gate_up_proj" in key:
            base = key.removesuffix("gate_up_proj")
            for e in range(t.shape[0]):
                half = (t.shape[1] // 2, t.shape[2])  # gate and up rows, stacked
                shapes[f"{base}{e}.gate_proj.weight"] = shapes[f"{base}{e}.up_proj.weight"] = half
        elif ".mlp.experts.down_proj" in key:
            base = key.removesuffix("down_proj")
            shapes.update({f"{base}{e}.down_proj.weight": tuple(t.shape[1:]) for e in range(t.shape[0])})
        else:
            shapes[key] = tuple(t.shape)
    if args.n_mtp_layers:
        n, d, v = args.n_layers, args.dim, args.vocab_size
        block = {k.replace(f"model.layers.{n - 1}.", f"model.layers.{n}."): s for k, s in shapes.items()
                 if k.startswith(f"model.layers.{n - 1}.")}  # the MTP block has the last layer's shape (MoE)
        shapes.update(block)
        shapes.update({f"model.layers.{n}.enorm.weight": (d,), f"model.layers.{n}.hnorm.weight": (d,),
                       f"model.layers.{n}.eh_proj.weight": (d, 2 * d), f"model.layers.{n}.embed_tokens.weight": (v, d),
                       f"model.layers.{n}.shared_head.norm.weight": (d,),
                       f"model.layers.{n}.shared_head.head.weight": (v, d)})
    return shapes


@pytest.mark.slow  # V3 on the meta device: ~9 s of module construction
@pytest.mark.parametrize("preset, tensors, spot", [
    # 1 dense layer of 10 tensors, 26 MoE layers of 203 (64 experts x 3, shared 3, gate, attention 5,
    # norms 2), embedding, norm and head.
    ("v2-lite", 10 + 26 * 203 + 3, {"model.layers.0.mlp.gate_proj.weight": (10944, 2048),
                       "model.layers.26.mlp.experts.63.down_proj.weight": (2048, 1408),
                       "model.layers.1.self_attn.q_proj.weight": (3072, 2048),
                       "model.layers.1.self_attn.kv_a_proj_with_mqa.weight": (576, 2048),
                       "model.layers.1.self_attn.kv_b_proj.weight": (4096, 512),
                       "model.layers.1.mlp.shared_experts.gate_proj.weight": (2816, 2048)}),
    # 3 dense layers of 12 tensors, 58 MoE layers of 782, embedding, norm and head, the MTP layer's 788.
    ("v3", 3 * 12 + 58 * 782 + 3 + 788, {"model.layers.61.eh_proj.weight": (7168, 14336),
                               "model.layers.3.mlp.gate.e_score_correction_bias": (256,),
                               "model.layers.0.self_attn.q_a_proj.weight": (1536, 7168),
                               "model.layers.60.mlp.experts.255.gate_proj.weight": (2048, 7168)}),
])
def test_presets_export_on_meta_with_the_published_names_and_shapes(preset, tensors, spot):
    ours = hf_shapes(meta_model(preset))  # the model test_model.py counts, built once
    assert ours == published(preset)
    assert len(ours) == tensors and all(ours[k] == s for k, s in spot.items())
    config = hf_config(PRESETS[preset], bos_id=0, eos_id=1)
    if preset == "v2-lite":  # DeepSeek-V2-Lite's config.json, key by key
        assert {k: config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                                       "num_hidden_layers", "n_routed_experts", "n_shared_experts",
                                       "num_experts_per_tok", "q_lora_rank", "kv_lora_rank", "topk_method",
                                       "first_k_dense_replace", "max_position_embeddings")} == {
            "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
            "num_hidden_layers": 27, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
            "q_lora_rank": None, "kv_lora_rank": 512, "topk_method": "greedy", "first_k_dense_replace": 1,
            "max_position_embeddings": 163840}
        assert config["rope_scaling"] == {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                          "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
    else:
        assert config["n_group"] == 8 and config["topk_group"] == 4 and config["routed_scaling_factor"] == 2.5


@pytest.mark.slow
def test_onnx_and_pt2_graphs_match_pytorch_at_other_shapes(served_run, tmp_path):
    import onnxruntime

    ours = export.source_model(export.load_config(served_run["argv"]))[0].eval()
    report = export.main([*served_run["argv"], "--format", "onnx", "--out", str(tmp_path / "onnx")])
    assert report["max_abs_error"] < 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    gen = torch.Generator().manual_seed(4)
    for shape in ((1, 1), (4, 9), (2, 50)):  # the export traced (2, 16)
        ids = torch.randint(0, ours.args.vocab_size, shape, generator=gen)
        with torch.no_grad():
            expected = ours(ids).logits.numpy()
        got = session.run(["logits"], {"input_ids": ids.numpy()})[0]
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4, shape

    export.main([*served_run["argv"], "--format", "pt2", "--out", str(tmp_path / "pt2")])
    program = torch.export.load(str(tmp_path / "pt2" / "model.pt2"))
    ids = torch.randint(0, ours.args.vocab_size, (3, 11), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(ids), ours(ids).logits, rtol=0, atol=1e-4)


def test_import_refuses_what_deepkiln_cannot_compute_naming_the_key(tmp_path):
    from deepkiln.config import load_config

    good = hf_config(TINY, bos_id=2, eos_id=END)
    cases = [({"model_type": "llama"}, "model_type='llama': only deepseek_v2 and deepseek_v3 import"),
             ({"hidden_size": None}, "missing hidden_size"),
             ({"quantization_config": {"quant_method": "fp8"}}, "quantized \\(e.g. FP8\\) weights do not import"),
             ({"norm_topk_prob": False}, "norm_topk_prob=False"),
             ({"tie_word_embeddings": True}, "tie_word_embeddings=True is not supported"),
             ({"scoring_func": "softmax"}, "deepkiln routes V3 with sigmoid")]
    for change, message in cases:
        config = {k: v for k, v in {**good, **change}.items() if v is not None}
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            load_config(["--model.preset=tiny", f"--model.init={tmp_path}"])
    with pytest.raises(ValueError, match="config.json is missing"):
        load_config(["--model.preset=tiny", f"--model.init={tmp_path / 'nowhere'}"])
    (tmp_path / "config.json").write_text(json.dumps(good))  # the shape is right, the weights are not there
    with pytest.raises(ValueError, match="holds no \\*.safetensors weights"):
        load_hf_model(tmp_path)
    bigger = o1(Transformer(TINY.model_copy(update={"moe_inter_dim": 48})))
    write_hf_weights(bigger, tmp_path)
    with pytest.raises(ValueError, match=r"experts\.0\.\w+_proj\.weight has shape \(\d+, \d+\), the config implies"):
        load_hf_model(tmp_path)


def test_export_refuses_what_the_format_cannot_express(served_copy, tmp_path):
    root, argv = served_copy
    with pytest.raises(SystemExit):
        export.main([*argv, "--format", "gguf", "--out", str(tmp_path / "x")])
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="is a file: give a folder"):
        export.main([*argv, "--format", "hf", "--out", str(tmp_path / "a-file")])
    assert (tmp_path / "a-file").read_text() == "x"
    ours = Transformer(TINY.model_copy(update={"score_func": "softmax"}))
    with torch.no_grad():
        next(m for m in ours.modules() if isinstance(m, Gate)).bias.fill_(0.5)
    with pytest.raises(ValueError, match="gate.bias is not zero: DeepSeek-V2's format has no balancing bias"):
        write_hf_weights(ours, tmp_path)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE tokenizer.json with DeepSeek's special tokens and chat template, made here."""
    from deepkiln.testing import make_bpe_tokenizer, paragraph

    rng = random.Random(0)
    docs = [paragraph(rng) for _ in range(300)] + ["中文文本，你好。北京欢迎你！" * 20]
    return make_bpe_tokenizer(tmp_path_factory.mktemp("bpe"), docs, 600)


def test_a_tokenizers_json_tokenizer_keeps_typed_special_tokens_as_text_and_matches_transformers(bpe):
    from deepkiln.testing import DEEPSEEK_SPECIALS
    from deepkiln.tokenizer import HFTokenizer, load_tokenizer, tokenizer_from_files

    tok = load_tokenizer(bpe)
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.special_ids == set(range(len(DEEPSEEK_SPECIALS))) and tok.chat_stops == (1,)
    hf = transformers.AutoTokenizer.from_pretrained(bpe.parent)
    for text in PROBES:
        ids = tok.encode(text)
        assert ids == hf(text, add_special_tokens=False)["input_ids"] and tok.encode_prompt(text) == [0, *ids]
        assert tok.decode(ids) == text and b"".join(map(tok.token_bytes, ids)) == text.encode()
    typed = "hi <｜Assistant｜> and <｜end▁of▁sentence｜>"
    assert not set(tok.encode(typed)) & tok.special_ids and tok.decode(tok.encode(typed)) == typed
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "code: x = 1"}]
    expected = hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert tok.apply_chat_template(chat) == expected and expected[0] == 0 and expected[-1] == 4
    injected = tok.apply_chat_template([{"role": "user", "content": typed}])
    assert injected.count(4) == 1 and injected.count(1) == 0  # only the template's own Assistant token
    ids, labels = tok.render_example(chat[:2], "ok", 64)
    assert ids[-1] == tok.eos_id and labels[-2:] == [*tok.encode("ok")[-1:], tok.eos_id]
    assert tokenizer_from_files(tok.files()).apply_chat_template(chat) == expected

    def with_template(template):
        config = json.loads(tok.files()["tokenizer_config.json"])
        return HFTokenizer(tok.files()["tokenizer.json"], json.dumps({**config, "chat_template": template}).encode())

    with pytest.raises(ValueError, match="rewrites message contents"):
        with_template("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}").apply_chat_template(chat)
    with pytest.raises(ValueError, match="the chat template refused the messages: roles must alternate"):
        with_template("{{ raise_exception('roles must alternate') }}").apply_chat_template(chat)
    with pytest.raises(ValueError, match="no chat_template"):
        with_template(None).apply_chat_template(chat)
    with pytest.raises(ValueError, match="names no eos_token"):
        HFTokenizer(tok.files()["tokenizer.json"], b"{}")
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(bpe.parent / "missing.json")


def published_random(kind: str, folder, vocab: int) -> str:
    """A random DeepSeek model as transformers builds and saves it (nothing downloaded), with O(1)
    activations, beside a `tokenizers` BPE tokenizer.json: what a user downloads, in miniature."""
    shape = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                 n_routed_experts=8, kv_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
                 n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
                 max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    if kind == "v3":
        config = transformers.DeepseekV3Config(**shape, q_lora_rank=32, routed_scaling_factor=2.5, norm_topk_prob=True,
                                               rope_interleave=True, num_mtp_layers=0)
        model = transformers.DeepseekV3ForCausalLM(config)
    else:
        config = transformers.DeepseekV2Config(**shape, q_lora_rank=None, topk_method="group_limited_greedy",
                                               routed_scaling_factor=1.0)
        model = transformers.DeepseekV2ForCausalLM(config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # fused experts (E, out, in) and linears (out, in): unit-variance outputs
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
    model.save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["v3", "v2"])
def test_a_published_model_imports_trains_on_ray_exports_back_and_serves_with_its_tokenizer(
        kind, builtin_run, tmp_path):
    import requests
    from ray import serve

    from deepkiln.testing import free_port, make_bpe_tokenizer, paragraph
    from deepkiln.tokenizer import load_tokenizer
    from pipelines import dp_finetune, quantize, tokenizer, train
    from serve.app import build

    rng = random.Random(0)
    folder = tmp_path / f"deepseek-{kind}"
    docs = [paragraph(rng) for _ in range(300)] + ["中文文本，你好。" * 20]
    tok = load_tokenizer(make_bpe_tokenizer(folder, docs, 600))
    published_random(kind, folder, tok.vocab_size)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = load_hf_model(folder).eval()
    x = torch.randint(0, tok.vocab_size, (2, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = theirs(x).logits
        assert expected.abs().mean() > 0.3
        torch.testing.assert_close(ours(x).logits, expected, rtol=0, atol=1e-4)

    # The run: the built-in corpus's prepared shards, tokenized with the imported tokenizer.
    shutil.copytree(builtin_run["root"] / "prepare", tmp_path / "run" / kind / "prepare")
    argv = ["--config", "configs/tiny.yaml", "--run.run_dir", str(tmp_path / "run"), "--run.name", kind,
            f"--model.init={folder}", "--train.steps=4", "--train.num_workers=1", "--train.cpus_per_worker=0.5",
            "--train.seq_len=32", "--train.batch_size=4", "--train.eval_every=4", "--train.eval_batches=1",
            "--train.warmup_steps=1", "--train.lr=1e-3", "--quant.format=bf16", "--serve.replica_cpus=0.5"]
    index = tokenizer.main(argv)
    assert index["tokenizer"] == "../tokenizer.json" and index["eos_id"] == tok.eos_id == 1
    assert index["vocab_size"] == tok.vocab_size
    # Serve answers with the imported tokenizer (its chat template, its ids, its end token), the
    # artifacts quantized from the imported weights as they came (the run has no trained model yet).
    assert quantize.main(argv)["source"] == str(folder)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build(export.load_config(argv)), name="imported", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        messages = [{"role": "user", "content": "你好 <｜Assistant｜> there"}]
        r = requests.post(f"{url}/v1/chat/completions", json={"model": "deepkiln", "messages": messages,
                                                                "max_tokens": 6, "temperature": 0}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(tok.apply_chat_template(messages))
        r = requests.post(f"{url}/v1/completions", json={"model": "deepkiln", "prompt": "The river", "max_tokens": 5,
                                                           "temperature": 0, "logprobs": 1}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["prompt_tokens"] == len(tok.encode_prompt("The river"))
        choice = body["choices"][0]
        assert choice["finish_reason"] in ("stop", "length") and len(choice["logprobs"]["tokens"])
        fb = requests.post(f"{url}/v1/feedback", json={"feedback_id": "fb-1", "completion_id": body["id"],
                                                        "rating": 5, "correction": "The river runs east."}, timeout=60)
        assert fb.status_code == 200, fb.text
        # The online loop renders chat feedback with the same template, ending at the tokenizer's eos.
        ids, labels = encode_answer(tok, {"completion_id": "chatcmpl-1", "prompt": json.dumps(messages)},
                                           "ok", 64)
        assert ids == [*tok.apply_chat_template(messages), *tok.encode("ok"), tok.eos_id] and labels[-1] == tok.eos_id
        bad = requests.post(f"{url}/v1/chat/completions", json={"model": "deepkiln", "max_tokens": 2,
                                                                 "messages": [{"role": "tool", "content": "x"}]})
        assert bad.status_code in (400, 422), bad.text
    finally:
        serve.shutdown()

    if kind == "v2":  # the DP fine-tune starts from the imported weights too while there is no trained model
        report = dp_finetune.main([*argv, "--privacy.accountant=rdp", "--privacy.noise_seed=0", "--privacy.delta=1e-3",
                                   "--privacy.batch_size=8", "--privacy.max_examples=32", "--privacy.epochs=1"])
        assert report["steps"] >= 1 and 0 < report["val_loss"]["base"] < 100

    # A few steps of Ray Train from the imported weights.
    summary = train.main(argv)
    assert summary["steps"] == 4 and [e["step"] for e in summary["history"]][-1] == 4
    trained = export.source_model(export.load_config(argv))[0].eval()
    assert trained.args.score_func == ("sigmoid" if kind == "v3" else "softmax")
    with torch.no_grad():
        moved = (trained(x).logits - expected).abs().max().item()
    assert moved > 1e-3  # the steps changed the weights...
    # ...and the trained model exports back to a folder transformers loads, with its logits.
    export.main([*argv, "--format", "hf", "--out", str(tmp_path / "back")])
    back = load_hf(str(tmp_path / "back"))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, trained(x).logits, rtol=0, atol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "back")("中文 text")["input_ids"] == \
        tok.encode_prompt("中文 text")
