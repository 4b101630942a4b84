"""A small trained run for benchmarks and tests, made from nothing on this machine: made-up English
text, a tokenizer trained on it, its token shards, and the tiny model trained on them for a few
seconds, laid out as the tokenizer and train stages lay them out.

    argv = make_run(Path(tmp))            # then: pipelines.quantize.main(argv), serve it, ...
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import socket
from pathlib import Path

import numpy as np
import torch

from deepkiln.checkpoint import save_checkpoint
from deepkiln.config import load_config
from deepkiln.model import PRESETS, Transformer, lm_losses
from deepkiln.tokenizer import EOS_ID, Tokenizer, train_tokenizer
from deepkiln.training import update_expert_bias

STEPS = 60
# configs/tiny.yaml's model and dtypes, without needing the file (a non-editable install has none).
TINY = ["--model.preset=tiny", "--train.dtype=float32", "--serve.dtype=float32"]
WORDS = ("time year people way day man thing woman life child world school state family student "
         "group country problem hand part place case week company system program question work "
         "government number night point home water room mother area money story fact month lot "
         "right study book eye job word business issue side kind head house service friend father "
         "power hour game line end member law car city community name president team minute idea "
         "kid body information back parent face others level office door health person art war "
         "history party result change morning reason research girl guy moment air teacher force "
         "education river garden window bridge market letter summer winter village doctor").split()


def paragraph(rng: random.Random, n_words: int = 90) -> str:
    """Made-up English: sentences of nine common nouns."""
    sentences, words = [], [rng.choice(WORDS) for _ in range(n_words)]
    for i in range(0, n_words, 9):
        s = " ".join(words[i:i + 9])
        sentences.append(s[0].upper() + s[1:] + ".")
    return " ".join(sentences)


# Common Chinese words (nouns, verbs, adjectives), for made-up Chinese as `paragraph` makes English.
ZH_WORDS = ("时间 人们 国家 学校 学生 老师 朋友 家庭 孩子 父亲 母亲 城市 农村 工作 生活 问题 社会 经济 文化 历史 "
            "科学 技术 语言 文字 音乐 电影 书籍 报纸 新闻 故事 山水 河流 森林 花园 天气 春天 夏天 秋天 冬天 早晨 "
            "晚上 医生 工人 农民 商店 市场 银行 医院 公园 车站 机场 道路 桥梁 房子 窗户 桌子 椅子 电脑 手机 "
            "米饭 面条 水果 蔬菜 茶叶 咖啡 衣服 鞋子 帽子 颜色 声音 味道 方法 原因 结果 计划 目标 机会 希望 "
            "经验 知识 能力 习惯 健康 安全 自由 和平 发展 变化 增加 减少 学习 研究 讨论 决定 准备 参加 访问 "
            "旅行 休息 帮助 支持 保护 建设 管理 服务 生产 销售 购买 使用 选择 表示 认为 发现 了解 记得 忘记 "
            "喜欢 相信 美丽 干净 安静 热闹 重要 简单 复杂 困难 容易 快乐 认真 仔细 勇敢 聪明 年轻 古老 新鲜 "
            "温暖 寒冷 明亮 黑暗 丰富 普通 特别 传统 现代 自然 地方 世界 邻居 船只 星星 月亮 太阳 海洋 草原").split()


def zh_paragraph(rng: random.Random, n_words: int = 60) -> str:
    """Made-up Chinese: sentences of twelve common words, a comma in the middle."""
    words, sentences = [rng.choice(ZH_WORDS) for _ in range(n_words)], []
    for i in range(0, n_words, 12):
        part = words[i:i + 12]
        sentences.append("".join(part[:6]) + "，" + "".join(part[6:]) + "。")
    return "".join(sentences)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_args(root: Path, name: str = "served") -> list[str]:
    """The argv that points stages at a run of make_run's shape under `root`."""
    return [*TINY, "--run.run_dir", str(root), "--run.name", name, "--tokenizer.vocab_size=512",
            "--train.seq_len=64", "--train.batch_size=8", "--train.eval_batches=2", "--train.val_fraction=0.1"]


def make_run(root: Path, name: str = "served") -> list[str]:
    """Build <root>/<name>/{tokenizer,train/model} and return the argv that points stages at it."""
    argv = run_args(root, name)
    cfg = load_config(argv)
    rng = random.Random(0)
    docs = [paragraph(rng, rng.randint(20, 80)) for _ in range(400)]
    tok_dir = root / name / "tokenizer"
    (tok_dir / "tokens").mkdir(parents=True)
    tokenizer = Tokenizer(train_tokenizer(docs, 512))
    tokenizer.save(tok_dir / "tokenizer.model")
    ids = np.array([i for ids in tokenizer.encode_batch(docs) for i in [*ids, EOS_ID]], dtype=np.uint16)
    ids.tofile(tok_dir / "tokens" / "docs.bin")
    shard = {"shard": "docs", "docs": len(docs), "tokens": len(ids), "dtype": "uint16", "bin": "docs.bin"}
    (tok_dir / "tokens" / "index.json").write_text(
        json.dumps({"vocab_size": tokenizer.vocab_size, "dtype": "uint16", "shards": [shard]}))

    torch.manual_seed(0)
    model = Transformer(cfg.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.from_numpy(ids.astype(np.int64))
    t = cfg.train
    for _ in range(STEPS):
        starts = torch.randint(0, len(data) // 2, (t.batch_size,))
        chunk = torch.stack([data[s:s + t.seq_len + 1] for s in starts.tolist()])
        lm_losses(model(chunk[:, :-1], mtp=True), chunk[:, 1:], cfg.model)["loss"].backward()
        opt.step()
        opt.zero_grad()
        update_expert_bias(model)
    save_checkpoint(root / name / "train" / "model", model, cfg.to_dict(), step=STEPS)
    return argv


def unigram_entropy(tokens_dir: str | Path) -> float:
    """The unigram entropy (nats per token) of a token folder's training stream: the loss a model that
    learned only token frequencies would reach."""
    from deepkiln.data import TokenWindows

    ids = np.concatenate([np.asarray(s) for s in TokenWindows(tokens_dir, 128).shards])
    p = np.bincount(ids) / len(ids)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@functools.cache
def meta_model(preset: str) -> Transformer:
    """The preset's model on the meta device, built once per process (V3's 46,000 modules take ~7 s)."""
    with torch.device("meta"):
        return Transformer(PRESETS[preset])


def hf_folder(model: Transformer, out: Path) -> str:
    """`model` as a transformers folder (weights and config.json, float32), without a tokenizer."""
    from deepkiln.hf import write_hf_weights
    from deepkiln.hf_config import hf_config
    from deepkiln.tokenizer import SPECIAL_TOKENS

    out.mkdir(parents=True, exist_ok=True)
    write_hf_weights(model, out)
    eos = [EOS_ID, SPECIAL_TOKENS["<|end|>"]]
    (out / "config.json").write_text(json.dumps(hf_config(model.args, bos_id=2, eos_id=eos, dtype="float32")))
    return str(out)


def copy_run(argv: list[str], dest: Path) -> list[str]:
    """Copy the run `argv` points at (its --run.run_dir / --run.name folder) under `dest`; returns
    the argv of the copy (same run name), for a test or benchmark that writes into a run."""
    argv = list(argv)
    i, name = argv.index("--run.run_dir") + 1, argv[argv.index("--run.name") + 1]
    shutil.copytree(Path(argv[i]) / name, Path(dest) / name)
    argv[i] = str(dest)
    return argv


def loss_curves(config: dict) -> None:
    """A Ray Train worker function for tests: the same pretraining steps (deepkiln.training's
    build_engine and train_step, as pipelines.train runs them) under each of several settings in
    turn, in one worker group; rank 0 writes {name: [mean loss per step]} as JSON to config["out"].
    config: {"cfg": a Config dict, "settings": {name: {"section.key": value, ...}}, "out": a path}."""
    import ray.train
    import torch.distributed as dist

    from deepkiln.config import Config
    from deepkiln.evaluate import windows
    from deepkiln.training import build_engine, train_step

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    curves = {}
    for name, overrides in config["settings"].items():
        tree = Config.from_dict(config["cfg"]).to_dict()
        for key, value in overrides.items():
            section, field = key.split(".")
            tree[section][field] = value
        cfg = Config.from_dict(tree)
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
        data, (engine, _) = windows(cfg), build_engine(cfg, world)
        curve = []
        for step in range(cfg.train.steps):
            loss = train_step(engine, data, step, cfg, rank, world).lm.detach().clone()
            dist.all_reduce(loss)
            curve.append(loss.item() / world)
        curves[name] = curve
        del engine
    if rank == 0:
        Path(config["out"]).write_text(json.dumps(curves))


# A DeepSeek-style chat template and special tokens, for tokenizers made in tests.
DEEPSEEK_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>", "<｜Assistant｜>"]
DEEPSEEK_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}")


def make_bpe_tokenizer(folder: Path, docs: list[str], vocab_size: int = 512) -> Path:
    """A byte-level BPE tokenizer.json trained on `docs` with DeepSeek's special tokens and a
    DeepSeek-style chat template in tokenizer_config.json, as published DeepSeek tokenizers come
    (made here: nothing is downloaded). Returns the tokenizer.json path."""
    from tokenizers import Tokenizer as Fast
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = Fast(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=DEEPSEEK_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    bos = DEEPSEEK_SPECIALS[0]  # [BOS] first, as published DeepSeek tokenizers' post-processor adds it
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": DEEPSEEK_SPECIALS[0],
              "eos_token": DEEPSEEK_SPECIALS[1], "pad_token": DEEPSEEK_SPECIALS[2], "add_bos_token": True,
              "add_eos_token": False, "chat_template": DEEPSEEK_TEMPLATE, "model_max_length": 256}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1))
    return folder / "tokenizer.json"
