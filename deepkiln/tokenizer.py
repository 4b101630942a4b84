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


def train_tokenizer(texts: Iterable[str], vocab_size: int, character_coverage: float = 0.9995,
                    seed: int = 0) -> bytes:
    """Train a BPE model on `texts` (whole documents; newlines are kept) and return its bytes.
    The same texts and arguments give identical bytes. `seed` seeds SentencePiece's global RNG; BPE
    over the whole input draws no random numbers today, so it changes nothing yet."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is below the minimum {MIN_VOCAB_SIZE}: byte fallback "
                         f"needs 256 byte pieces plus {len(SPECIAL_TOKENS)} special tokens and one more")
    if not 0.98 <= character_coverage <= 1.0:
        raise ValueError(f"character_coverage={character_coverage} must be in [0.98, 1.0] (SentencePiece's range)")
    seen = {"docs": 0, "done": False}

    def documents():
        for text in texts:
            seen["docs"] += bool(text)
            yield text
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
    """A trained model: plain-text encode/decode, batched encode and the chat template."""

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
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in _ROLE_IDS:
                role = m.get("role") if isinstance(m, dict) else None
                raise ValueError(f"messages[{i}].role={role!r} must be one of {sorted(_ROLE_IDS)}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}].content must be a string, got "
                                 f"{type(m.get('content')).__name__}")
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
        tail = [*self.encode(target), _END_ID if chat else EOS_ID]
        return (head + tail)[:max_len], ([-100] * len(head) + tail)[:max_len]
