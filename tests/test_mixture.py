"""train.mixture: the tokenizer stage's per-document labels, the windows each stratum's documents are
cut into, the blend of samples across strata, and the per-stratum losses pretraining reports.

Shards are encoded by a real ShardOwner (the actor's class, without Ray) with a real SentencePiece
tokenizer; the strata are told apart by script, so a window can be checked to hold one stratum's text.
"""

import json
import random
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from actors.shard import ShardOwner
from deepkiln.config import load_config
from deepkiln.data import TokenWindows
from deepkiln.evaluate import mean_loss
from deepkiln.model import Transformer
from deepkiln.splits import blend_index
from deepkiln.tokenizer import Tokenizer, train_tokenizer

SEQ = 16
ZH, EN, RU = "春夏秋冬山水日月风花雪云天地人心江河", "abcdefghijklmnopqrstuvwxyz", "абвгдежзиклмнопрст"
SCRIPT = {"zh": re.compile(f"[{ZH}]"), "en": re.compile("[a-z]"), "ru": re.compile(f"[{RU}]")}


def doc(rng: random.Random, letters: str, n: int) -> str:
    sep = "" if letters == ZH else " "
    return sep.join("".join(rng.choice(letters) for _ in range(rng.randint(2, 5))) for _ in range(n))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """Two shards of zh (large), en (small) and ru (smaller) documents from three source files,
    every split present, encoded as pipelines.tokenizer encodes them."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("mixture")
    prep, out = root / "prepare", root / "tokens"
    (prep / "shards").mkdir(parents=True)
    kinds = [("zh", ZH, "books/zh:tang.txt", 120), ("en", EN, "web/en.jsonl", 40), ("ru", RU, "web/ru.jsonl", 24)]
    texts = [doc(rng, letters, 30) for _, letters, _, n in kinds for _ in range(n)]
    tok = Tokenizer(train_tokenizer(texts, 400))
    cfg = load_config(["--config", "configs/tiny.yaml"]).to_dict()
    entries, i, docs = [], 0, []
    for shard in ("s0", "s1"):
        rows = []
        for lang, letters, source, n in kinds:
            for k in range(n // 2):
                split = "validation" if k % 10 == 9 else "test" if k % 10 == 8 else "train"
                rows.append({"id": i, "source": f"{source}:{k}", "text": doc(rng, letters, 30), "lang": lang,
                             "split": split})
                i += 1
        rng.shuffle(rows)  # strata interleaved within the shard
        docs += rows
        pq.write_table(pa.Table.from_pylist(rows), prep / "shards" / f"{shard}.parquet")
        entries += ShardOwner(shard, [], cfg, str(prep)).encode(tok.files(), str(out))
    (out / "index.json").write_text(json.dumps({"vocab_size": tok.vocab_size, "dtype": entries[0]["dtype"],
                                                "shards": entries}))
    return out, tok, docs


def trained_on(docs, lang: str) -> int:
    """How many documents of `lang` training reads (train and validation splits)."""
    return sum(d["lang"] == lang and d["split"] != "test" for d in docs)


def script_of(tok, window) -> set[str]:
    text = tok.decode([int(t) for t in window])
    return {lang for lang, pattern in SCRIPT.items() if pattern.search(text)}


def test_encode_writes_each_documents_language_and_source_file(tokens):
    out, _, _ = tokens
    index = json.loads((out / "index.json").read_text())
    assert {e["split"] for e in index["shards"]} == {"train", "validation", "test"}
    for e in index["shards"]:
        bounds, lang = np.load(out / e["idx"]), np.load(out / e["labels"]["lang"]["codes"])
        source = np.load(out / e["labels"]["source"]["codes"])
        assert len(lang) == len(source) == len(bounds) - 1 == e["docs"]
        assert e["labels"]["lang"]["legend"] == ["en", "ru", "zh"]
        # a source is the file, not the record (a file name may hold a colon)
        assert e["labels"]["source"]["legend"] == ["books/zh:tang.txt", "web/en.jsonl", "web/ru.jsonl"]
        lengths = np.diff(bounds)
        assert e["labels"]["lang"]["tokens"] == {x: int(lengths[lang == k].sum())
                                                 for k, x in enumerate(["en", "ru", "zh"])}
        assert sum(e["labels"]["lang"]["tokens"].values()) == e["tokens"]


def test_each_sample_is_a_window_of_its_strata_documents_in_blend_proportions(tokens):
    out, tok, _ = tokens
    weights = {"zh": 0.2, "en": 0.3, "ru": 0.5}  # the smallest stratum gets the largest share
    data = TokenWindows(out, SEQ, seed=3, mixture=weights)
    n = 400
    strata = [data.stratum(i) for i in range(n)]
    assert strata == blend_index(weights, n).tolist()
    for i in range(n):
        assert script_of(tok, data.window(data.train_window_id(i))) == {data.strata[strata[i]]}, i
    # every training window of a stratum is visited once per epoch of that stratum, then reshuffled
    ru = [data.train_window_id(i) for i in range(n) if strata[i] == 2]
    per_epoch = data.train_windows["ru"]
    assert sorted(ru[:per_epoch]) == list(range(data.offsets[2], data.offsets[2] + per_epoch))
    assert ru[per_epoch:2 * per_epoch] != ru[:per_epoch]
    # deterministic and random-access: a resumed run (a fresh object asked from sample 300 on) agrees
    again = TokenWindows(out, SEQ, seed=3, mixture=weights)
    assert [again.train_window_id(i) for i in range(300, n)] == [data.train_window_id(i) for i in range(300, n)]
    x, y = data.train_batch(0, 8)
    assert x.shape == y.shape == (8, SEQ) and torch.equal(x[:, 1:], y[:, :-1])


def test_held_out_windows_are_the_validation_documents_interleaved_by_weight(tokens):
    out, tok, _ = tokens
    data = TokenWindows(out, SEQ, mixture={"zh": 1, "en": 1, "ru": 2})
    order = [script_of(tok, data.window(data.n_train + v)) for v in range(data.n_val)]
    assert all(len(s) == 1 for s in order)
    first = [next(iter(s)) for s in order[:8]]
    assert first.count("ru") == 4 and first.count("zh") == 2 and first.count("en") == 2, first
    for lang in ("zh", "en", "ru"):
        windows = [w for x, _ in data.val_batches(2, 100, lang) for w in x.tolist()]
        assert len(windows) == data.val_windows[lang] and all(script_of(tok, w) == {lang} for w in windows)
    with pytest.raises(ValueError, match="train.mixture is not set"):
        next(TokenWindows(out, SEQ).val_batches(2, 1, "zh"))


def test_other_takes_the_rest_and_source_globs_name_files(tokens):
    out, tok, docs = tokens
    data = TokenWindows(out, SEQ, mixture={"zh": 0.5, "other": 0.5})
    seen = {data.strata[data.stratum(i)]: set() for i in range(40)}
    for i in range(200):
        seen[data.strata[data.stratum(i)]] |= script_of(tok, data.window(data.train_window_id(i)))
    assert seen == {"zh": {"zh"}, "other": {"en", "ru"}}
    by_source = TokenWindows(out, SEQ, mixture={"web/*": 1, "books/zh:tang.txt": 1}, mixture_by="source")
    web = trained_on(docs, "en") + trained_on(docs, "ru")
    assert by_source.describe()["web/*"]["docs"] == web
    assert by_source.describe()["books/zh:tang.txt"]["docs"] == trained_on(docs, "zh")
    # without `other`, documents no key names are left out, and said to be
    only_zh = TokenWindows(out, SEQ, mixture={"zh": 1})
    assert only_zh.describe()["left_out"]["docs"] == web
    assert f"{web} documents in no stratum are left out" in only_zh.mixture_summary(1000)


def test_a_mixture_key_that_names_nothing_is_an_error_listing_what_there_is(tokens):
    out, _, _ = tokens
    with pytest.raises(ValueError, match=r"train.mixture names 'ja'.*found: zh \(\d+ docs\), en"):
        TokenWindows(out, SEQ, mixture={"zh": 1, "ja": 1})
    index = json.loads((out / "index.json").read_text())
    old = out.parent / "old"
    old.mkdir(exist_ok=True)
    for e in index["shards"]:
        e.pop("labels")
        for f in (e["bin"], e["idx"]):
            (old / f).write_bytes((out / f).read_bytes())
    (old / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="re-run pipelines.tokenizer"):
        TokenWindows(old, SEQ, mixture={"zh": 1})
    TokenWindows(old, SEQ)  # without a mixture, labels are not needed


def test_without_a_mixture_the_windows_are_the_plain_stream(tokens):
    """The stream without a mixture is the training shards in index order, then the validation ones."""
    out, _, _ = tokens
    data = TokenWindows(out, SEQ, seed=5)
    index = json.loads((out / "index.json").read_text())
    train = np.concatenate([np.fromfile(out / e["bin"], dtype=e["dtype"]) for e in index["shards"]
                            if e["split"] == "train"])
    val = np.concatenate([np.fromfile(out / e["bin"], dtype=e["dtype"]) for e in index["shards"]
                          if e["split"] == "validation"])
    assert data.n_train == (len(train) - 1) // SEQ and data.n_val == (len(val) - 1) // SEQ
    order = np.random.default_rng((5, 0)).permutation(data.n_train)
    for i in (0, 7, data.n_train - 1):
        k = int(order[i])
        assert data.train_window_id(i) == k
        assert data.window(k).tolist() == train[k * SEQ:(k + 1) * SEQ + 1].tolist()
    assert data.window(data.n_train + 2).tolist() == val[2 * SEQ:3 * SEQ + 1].tolist()
    assert data.strata == ["all"] and data.describe() == {}


def test_per_stratum_validation_loss_tells_the_strata_a_model_learned_from_the_one_it_did_not(tokens):
    """Twelve steps on zh and en only: their held-out losses fall below ru's, which the mixed loss
    (a blend of all three) lies between."""
    from deepkiln.model import lm_losses

    out, _, _ = tokens
    cfg = load_config(["--config", "configs/tiny.yaml"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seen = TokenWindows(out, SEQ, mixture={"zh": 1, "en": 1})
    for step in range(12):
        x, y = seen.train_batch(step * 4, 4)
        lm_losses(model(x, mtp=True), y, cfg.model)["loss"].backward()
        opt.step()
        opt.zero_grad()
    data = TokenWindows(out, SEQ, mixture={"zh": 1, "en": 1, "ru": 1})
    per = {s: mean_loss(model, data, 4, 3, s) for s in data.strata}
    assert max(per["zh"], per["en"]) + 1 < per["ru"], per
    assert min(per.values()) < mean_loss(model, data, 4, 3) < max(per.values())
