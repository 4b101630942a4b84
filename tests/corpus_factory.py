"""Test corpora with planted problems: near and exact duplicates, PII, junk and bad files."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq

from deepkiln.testing import paragraph  # noqa: F401  (re-exported for the tests)


def near_copy(text: str, rng: random.Random, changes: int = 1) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), changes):
        words[i] = "zebra" if not words[i].endswith(".") else "zebra."
    return " ".join(words)


def write_jsonl(path, docs, extra_lines=()):
    lines = [json.dumps({"text": d}) for d in docs] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_corpus(root, seed: int = 0, n: int = 150) -> dict:
    """Two big jsonl files (different shards), a txt, a Parquet file and bad files. Returns the
    planted facts the tests check."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    a = [paragraph(rng) for _ in range(n)]
    b = [paragraph(rng) for _ in range(n)]
    a[7] = a[7] + " Write to jane.doe@example.com or call 555-123-4567; card 4111 1111 1111 1111."
    a[8] = "#### $$$ {{{ }}} ### ### ... ... " * 20           # junk
    b[3] = near_copy(a[3], rng)                              # near duplicate across shards
    b[5] = "  " + a[5].upper().replace(" ", "   ") + "  "     # exact duplicate up to case/space
    write_jsonl(root / "a.jsonl", a)
    write_jsonl(root / "b.jsonl", b, extra_lines=['{"text": "unterminated', '{"body": "no text field"}'])
    (root / "c.txt").write_text(paragraph(rng, 60), encoding="utf-8")
    pq.write_table(pa.table({"text": [paragraph(rng) for _ in range(5)] + [near_copy(b[10], rng)]}),
                   root / "d.parquet")
    (root / "blob.txt").write_bytes(b"\x89PNG\x00\x00binary" * 50)
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 20)
    (root / "notes.csv").write_text("a,b\n1,2\n")
    return {"a": a, "b": b, "malformed_line": n + 1, "missing_field_line": n + 2}


# A small grammar of ordinary Chinese sentences: time, subject, place, verb, object.
ZH = {
    "time": "昨天 今天早上 每天晚上 下雨以后 春节前 周末 上个月 那年夏天 中午 天亮的时候".split(),
    "subject": ("老医生 年轻的老师 我的邻居 那位农民 孩子们 她的父亲 村里的木匠 我们班的同学 新来的厨师 "
                "一位老人").split(),
    "place": "在村子里 在河边 在市场上 在学校门口 在图书馆 在山脚下 在火车站 在小饭馆里 在院子里 在桥上".split(),
    "verb": "写了 带来了 找到了 卖掉了 画了 打开了 修好了 送来了 读完了 买了".split(),
    "object": "一封长信 那个木箱子 新鲜的面包 一幅山水画 旧自行车 两本小说 一篮苹果 一张地图 热茶 一双布鞋".split(),
}
EN = {
    "time": ["yesterday", "this morning", "every evening", "after the rain", "before the holiday", "at noon",
             "last month", "that summer", "on sunday", "at dawn"],
    "subject": ["the old doctor", "a young teacher", "my neighbour", "the farmer", "the children", "her father",
                "the village carpenter", "our classmate", "the new cook", "an old man"],
    "verb": ["wrote", "brought", "found", "sold", "painted", "opened", "repaired", "carried", "read", "bought"],
    "object": ["a long letter", "the wooden box", "fresh bread", "a landscape painting", "an old bicycle",
               "two novels", "a basket of apples", "a map", "hot tea", "a pair of shoes"],
    "place": ["in the village", "by the river", "at the market", "at the school gate", "in the library",
              "under the hill", "at the station", "in a small restaurant", "in the yard", "on the bridge"],
}


def zh_doc(rng: random.Random) -> tuple[str, list[str]]:
    """A paragraph of 4 to 8 sentences, and its words (for shuffling)."""
    words = []
    for _ in range(rng.randint(4, 8)):
        words += [rng.choice(ZH[k]) for k in ("time", "subject", "place", "verb", "object")] + ["。"]
    return "".join(words), words


def en_doc(rng: random.Random) -> tuple[str, list[str]]:
    words = []
    for _ in range(rng.randint(4, 8)):
        phrase = [rng.choice(EN[k]) for k in ("time", "subject", "verb", "object", "place")]
        words += " ".join(phrase).split() + ["."]
    return " ".join(words), words
