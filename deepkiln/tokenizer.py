"""SentencePiece BPE tokenizer with byte fallback, fixed special-token ids and a chat template.

    model = train_tokenizer(texts, vocab_size=4096)        # serialized model proto bytes
    tok = Tokenizer(model); tok.save("run/tokenizer.model")
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])

Text is never normalised (identity rule, no dummy prefix, spaces kept), and every character the
vocabulary lacks falls back to its UTF-8 bytes, so decode(encode(text)) == text for any string.
`encode` treats its input as plain text: role tokens come only from `apply_chat_template`.
"""

from __future__ import annotations

import functools
import io
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

SPECIAL_TOKENS = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3,
                  "<|system|>": 4, "<|user|>": 5, "<|assistant|>": 6, "<|end|>": 7}
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
_ROLE_IDS = {"system": SPECIAL_TOKENS["<|system|>"], "user": SPECIAL_TOKENS["<|user|>"],
             "assistant": SPECIAL_TOKENS["<|assistant|>"]}
_END_ID = SPECIAL_TOKENS["<|end|>"]
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1

# The chat template as Jinja, for exported folders (transformers' apply_chat_template, vLLM): the same
# ids as Tokenizer.apply_chat_template, except that a role token typed inside a message's content is
# read there as the role token itself (deepkiln's encode spells it out as bytes).
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] "
                 "+ '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")

# Substrings `encode` spells out as byte pieces: SentencePiece would match a role token's text as the
# token itself (prompt injection), and decodes its space marker U+2581 back as " ".
_ESCAPE = re.compile("(" + "|".join(re.escape(s) for s in [*_ROLE_TOKENS, "\u2581"]) + ")")
BATCH_THREADS_FROM = 16  # pieces; fewer are encoded one by one (see Tokenizer.encode_batch)


def character_fit(texts: list[str], vocab_size: int) -> tuple[dict[int, None] | None, dict]:
    """The characters a vocabulary of `vocab_size` holds as pieces of their own: at most half of the
    pieces left after the byte and special ones, the most frequent first (Chinese text has thousands
    of distinct characters: a 2,048 vocabulary keeps the ~900 commonest, which cover most of the text).
    Returns a str.translate table removing the others from the training text (None: every character
    fits) and {distinct_chars, kept_chars, kept_share}: kept_share is the share of the sample's
    characters that are kept. Characters left out are still encoded, as their UTF-8 bytes."""
    counts = Counter()
    for text in texts:
        counts.update(text)
    budget = (vocab_size - 256 - len(SPECIAL_TOKENS)) // 2
    ranked = counts.most_common()
    total = sum(counts.values()) or 1
    kept = ranked[:budget]
    info = {"distinct_chars": len(ranked), "kept_chars": len(kept),
            "kept_share": round(sum(n for _, n in kept) / total, 4)}
    return ({ord(c): None for c, _ in ranked[budget:]} if len(ranked) > budget else None), info


def train_tokenizer(texts: Iterable[str], vocab_size: int, character_coverage: float = 0.9995,
                    seed: int = 0) -> bytes:
    """Train a BPE model on `texts` (whole documents; newlines are kept) and return its bytes.
    The same texts and arguments give identical bytes. Characters beyond what the vocabulary can hold
    (`character_fit`) are left out of training and fall back to bytes, so any text trains at any
    vocabulary size. `seed` seeds SentencePiece's global RNG; BPE over the whole input draws no random
    numbers today, so it changes nothing yet."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is below the minimum {MIN_VOCAB_SIZE}: byte fallback "
                         f"needs 256 byte pieces plus {len(SPECIAL_TOKENS)} special tokens and one more")
    if not 0.98 <= character_coverage <= 1.0:
        raise ValueError(f"character_coverage={character_coverage} must be in [0.98, 1.0] (SentencePiece's range)")
    texts = list(texts)
    rare, _ = character_fit(texts, vocab_size)
    seen = {"docs": 0, "done": False}

    def documents():
        for text in texts:
            seen["docs"] += bool(text)
            yield text.translate(rare) if rare else text
        seen["done"] = True

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=documents(), model_writer=model, model_type="bpe",
            vocab_size=vocab_size, character_coverage=character_coverage, byte_fallback=True,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, user_defined_symbols=_ROLE_TOKENS,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            split_digits=True, allow_whitespace_only_pieces=True, hard_vocab_limit=False,
            # SentencePiece silently drops longer "sentences"; whole 3 MB documents train fine.
            max_sentence_length=1 << 30, minloglevel=1,
            # num_threads stays at SentencePiece's default: the pieces do not depend on it, but the
            # value is stored in the model, so a per-machine count would change the bytes.
        )
    except RuntimeError as e:
        if seen["done"] and seen["docs"] == 0:
            raise ValueError("texts holds no non-empty document to train the tokenizer on") from e
        if "required_chars" in str(e):
            raise ValueError(f"vocab_size={vocab_size} is too small for the distinct characters kept at "
                             f"character_coverage={character_coverage}: {e}") from e
        raise
    return model.getvalue()


class Tokenizer:
    """A trained model: plain-text encode/decode, batched encode and the chat template. Its special
    ids are the module's constants; `HFTokenizer` (an imported tokenizer.json) has the same
    interface with its own. `load_tokenizer` reads either."""

    bos_id, eos_id, pad_id = BOS_ID, EOS_ID, PAD_ID
    chat_stops = (EOS_ID, _END_ID)
    """Tokens that end a chat turn (the plain-text stop is eos_id)."""
    special_ids = frozenset(SPECIAL_TOKENS.values())

    def __init__(self, model_proto: bytes):
        self.model_proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        for piece, i in SPECIAL_TOKENS.items():
            if i >= self._sp.get_piece_size() or self._sp.id_to_piece(i) != piece:
                raise ValueError(f"model is not a deepkiln tokenizer: id {i} must be {piece!r}")
        self._byte_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
        if not all(self._sp.is_byte(i) for i in self._byte_ids):
            raise ValueError("model is not a deepkiln tokenizer: it lacks the 256 byte-fallback pieces")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls(Path(path).read_bytes())

    def files(self) -> dict[str, bytes]:
        """{file name: bytes}: what `tokenizer_from_files` rebuilds it from (sent to actors, carried
        inside artifacts)."""
        return {"tokenizer.model": self.model_proto}

    def save(self, path: str | Path) -> None:
        """Write the .model file under a temporary name, then rename it into place."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(self.model_proto)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def save_hf(self, folder: str | Path, max_length: int) -> list[str]:
        """Write the files transformers' AutoTokenizer loads as this tokenizer into `folder`: the
        SentencePiece model and a tokenizer_config.json under which a LlamaTokenizer gives the same
        ids (no prefix space, not legacy), adds [BOS] as `encode_prompt` does, knows the role tokens
        as special tokens and carries the chat template. Returns the file names."""
        import json

        folder = Path(folder)
        (folder / "tokenizer.model").write_bytes(self.model_proto)
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                   "additional_special_tokens": _ROLE_TOKENS}
        config = {"tokenizer_class": "LlamaTokenizer", **special, "add_bos_token": True, "add_eos_token": False,
                  "add_prefix_space": False, "legacy": False, "clean_up_tokenization_spaces": False,
                  "model_max_length": max_length, "chat_template": CHAT_TEMPLATE}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        return ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode each text as plain text (a large batch on all cores). Never yields ids 0..7."""
        parts = [_ESCAPE.split(text) for text in texts]  # plain, escaped, plain, ..., plain
        pieces = [p for ps in parts for p in ps[0::2]]
        # SentencePiece's batch call costs ~0.1 ms of thread-pool setup: a serving request's few
        # pieces are encoded one by one (~10x cheaper).
        plain = iter(self._sp.encode(pieces, num_threads=-1) if len(pieces) >= BATCH_THREADS_FROM
                     else [self._sp.encode(p) for p in pieces])
        out = []
        for ps in parts:
            ids = []
            for k, p in enumerate(ps):
                ids += next(plain) if k % 2 == 0 else [self._byte_ids[b] for b in p.encode()]
            out.append(ids)
        return out

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; pad/bos/eos decode to nothing and role tokens to their own text."""
        return self._sp.decode(list(ids))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """[BOS] then, per message, role token + content + <|end|>; then <|assistant|> if asked."""
        _check_messages(messages, _ROLE_IDS)
        ids = [BOS_ID]
        for m, content in zip(messages, self.encode_batch([m["content"] for m in messages])):
            ids += [_ROLE_IDS[m["role"]], *content, _END_ID]
        if add_generation_prompt:
            ids.append(_ROLE_IDS["assistant"])
        return ids

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for: a byte piece's byte, a text piece's UTF-8 (its space marker
        as a space), b"" for pad, bos and eos."""
        if self._sp.is_byte(token):
            return bytes([int(self._sp.id_to_piece(token)[3:5], 16)])
        if self._sp.is_control(token):
            return b""
        return self._sp.id_to_piece(token).replace("\u2581", " ").encode()

    @functools.cached_property
    def longest_piece_chars(self) -> int:
        """Characters the longest piece covers: a text of C characters takes at least C / this many
        tokens (byte pieces cover less than a character), so a long text can be refused unencoded."""
        return max(len(self._sp.id_to_piece(i)) for i in range(self.vocab_size) if not self._sp.is_byte(i))

    def encode_prompt(self, text: str) -> list[int]:
        """[BOS] text: a plain-text prompt as the server feeds it to the model."""
        return [BOS_ID, *self.encode(text)]

    def render_example(self, prompt: str | list[dict], target: str, max_len: int) -> tuple[list[int], list[int]]:
        """(ids, labels) of prompt + target + its stop token, cut to max_len: labels are the ids on
        the target and its stop, -100 on the prompt. A chat prompt (a list of messages) is rendered
        with the chat template and stops at <|end|>; a plain one stops at [EOS]."""
        chat = not isinstance(prompt, str)
        head = self.apply_chat_template(prompt) if chat else self.encode_prompt(prompt)
        tail = [*self.encode(target), self.chat_stops[-1] if chat else self.eos_id]
        return (head + tail)[:max_len], ([-100] * len(head) + tail)[:max_len]


def _check_messages(messages: list[dict], roles) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in roles:
            role = m.get("role") if isinstance(m, dict) else None
            raise ValueError(f"messages[{i}].role={role!r} must be one of {sorted(roles)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(m.get('content')).__name__}")




def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character each byte is written as -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (tokenizer.json; published DeepSeek tokenizers are
    byte-level BPE) with its tokenizer_config.json (special tokens, chat template): what a model
    imported with model.init brings. The same interface as Tokenizer. Plain text never becomes a
    special token (a role token typed in a prompt or message stays text); the chat template's own
    tokens do."""

    def __init__(self, tokenizer_json: bytes, config_json: bytes = b"{}"):
        try:
            from tokenizers import Tokenizer as Fast
        except ImportError as e:
            raise ValueError("a tokenizer.json tokenizer needs the `tokenizers` package: "
                             "pip install 'deepkiln[interop]'") from e
        import json

        self._json, self._config_json = bytes(tokenizer_json), bytes(config_json)
        try:
            self._tok = Fast.from_str(self._json.decode())
            self._plain = Fast.from_str(self._json.decode())
            config = json.loads(self._config_json or b"{}")
        except Exception as e:  # tokenizers raises its own Exception type
            raise ValueError(f"not a readable tokenizer.json / tokenizer_config.json: {e}") from None
        self._plain.encode_special_tokens = True  # user text never turns into control tokens
        self.config = config
        self.special_tokens = {k: self._token(config.get(k))
                               for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.bos_id = self._id(self.special_tokens["bos_token"])
        self.eos_id = self._id(self.special_tokens["eos_token"])
        if self.eos_id is None:
            raise ValueError("tokenizer_config.json names no eos_token in the vocabulary: generation could never stop")
        self.pad_id = self._id(self.special_tokens["pad_token"])
        self.pad_id = self.eos_id if self.pad_id is None else self.pad_id
        self.chat_stops = (self.eos_id,)
        self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name", "template"}, ...]: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template = template
        self._bytes = _byte_decoder() if self._byte_level() else None

    @staticmethod
    def _token(value) -> str | None:
        return value.get("content") if isinstance(value, dict) else value

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def _byte_level(self) -> bool:
        """Whether the decoder (or one in its sequence) is ByteLevel: read from the parsed decoder's
        own state, not by parsing the whole tokenizer.json (megabytes for published ones) again."""
        import json

        decoder = json.loads(self._tok.decoder.__getstate__()) if self._tok.decoder is not None else {}
        kinds = [decoder.get("type"), *(d.get("type") for d in decoder.get("decoders", []))]
        return "ByteLevel" in kinds

    @classmethod
    def load(cls, path: str | Path) -> HFTokenizer:
        """tokenizer.json, with the tokenizer_config.json beside it when there is one."""
        path = Path(path)
        config = path.with_name("tokenizer_config.json")
        return cls(path.read_bytes(), config.read_bytes() if config.is_file() else b"{}")

    def files(self) -> dict[str, bytes]:
        return {"tokenizer.json": self._json, "tokenizer_config.json": self._config_json}

    def save_hf(self, folder: str | Path, max_length: int) -> list[str]:
        for name, data in self.files().items():
            (Path(folder) / name).write_bytes(data)
        return list(self.files())

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def encode_prompt(self, text: str) -> list[int]:
        return [*([] if self.bos_id is None else [self.bos_id]), *self.encode(text)]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The tokenizer's own Jinja chat template, rendered with each message's content standing in
        as a marker no client can guess: the template's text is encoded with its special tokens, each
        content as plain text, so a special token typed in a message stays text. A template that
        drops, repeats or rewrites a content (so its marker does not come through once, whole) is
        refused: its contents could not be kept apart from its control tokens."""
        import secrets

        _check_messages(messages, {"system", "user", "assistant"})
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json): use the completions API")
        nonce = secrets.token_hex(8)
        marked = [{**m, "content": f"\ue000{nonce}:{i}\ue001"} for i, m in enumerate(messages)]
        parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", self._render(marked, add_generation_prompt))
        if sorted(int(i) for i in parts[1::2]) != list(range(len(messages))):
            raise ValueError("the tokenizer's chat template rewrites message contents: they cannot be kept as "
                             "plain text apart from its special tokens")
        ids = []
        for k, part in enumerate(parts):
            if k % 2:
                ids += self.encode(messages[int(part)]["content"])
            elif part:
                ids += self._tok.encode(part, add_special_tokens=False).ids
        return ids

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                **{k: v or "" for k, v in self.special_tokens.items()})
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template failed on these messages: {e}") from None

    def token_bytes(self, token: int) -> bytes:
        if token in self.special_ids:
            return b""
        piece = self._tok.id_to_token(token) or ""
        if self._bytes is not None and all(c in self._bytes for c in piece):
            return bytes(self._bytes[c] for c in piece)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    @functools.cached_property
    def longest_piece_chars(self) -> int:
        vocab = self._tok.get_vocab(with_added_tokens=False)
        return max(max(map(len, vocab), default=1), 1)

    def render_example(self, prompt: str | list[dict], target: str, max_len: int) -> tuple[list[int], list[int]]:
        return Tokenizer.render_example(self, prompt, target, max_len)  # type: ignore[arg-type]


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
"""The file that names a tokenizer, by kind: SentencePiece, or tokenizers' JSON (tokenizer_config.json beside it)."""


def load_tokenizer(path: str | Path) -> Tokenizer | HFTokenizer:
    """A tokenizer file: tokenizer.model (SentencePiece, deepkiln's own) or a tokenizer.json."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer {path} does not exist")
    return HFTokenizer.load(path) if path.suffix == ".json" else Tokenizer.load(path)


def tokenizer_from_files(files: dict[str, bytes]) -> Tokenizer | HFTokenizer:
    """The inverse of `files()`."""
    if "tokenizer.json" in files:
        return HFTokenizer(files["tokenizer.json"], files.get("tokenizer_config.json", b"{}"))
    return Tokenizer(files["tokenizer.model"])


def tokenizer_in(folder: str | Path) -> Path | None:
    """The tokenizer file inside `folder` (SentencePiece first), or None."""
    return next((Path(folder) / n for n in TOKENIZER_FILES if (Path(folder) / n).is_file()), None)
