"""A small run folder for the quantize and serving tests: a tokenizer trained on made-up English,
its token shards, and the tiny model trained on them for a few seconds, laid out as the tokenizer
and train stages lay them out."""

import json
import random
from pathlib import Path

import numpy as np
import torch

from deepkiln.checkpoint import save_checkpoint
from deepkiln.config import load_config
from deepkiln.model import Transformer
from deepkiln.tokenizer import EOS_ID, Tokenizer, train_tokenizer
from tests.corpus_factory import paragraph

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
STEPS = 60


def make_run(root: Path, name: str = "served") -> list[str]:
    """Build <root>/<name>/{tokenizer,train/model} and return the argv that points stages at it."""
    argv = ["--config", CONFIG, "--run.run_dir", str(root), "--run.name", name, "--tokenizer.vocab_size=512",
            "--train.seq_len=64", "--train.batch_size=8", "--train.eval_batches=2", "--train.val_fraction=0.1"]
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
        model(chunk[:, :-1], chunk[:, 1:])[1]["loss"].backward()
        opt.step()
        opt.zero_grad()
        model.update_expert_bias()
    save_checkpoint(root / name / "train" / "model", model, cfg.to_dict(), step=STEPS)
    return argv
