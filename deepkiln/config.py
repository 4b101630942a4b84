"""One typed config tree for every stage, loaded from defaults < YAML preset < dotted CLI overrides.

    cfg = load_config(["--config", "configs/tiny.yaml", "--train.lr=3e-4"])

Every section is a pydantic model that forbids unknown keys and casts values by their declared
type (PyYAML reads `1e-3` as a string; the CLI gives strings). Errors are `ValueError`s naming the
dotted key and the value. `cfg.to_dict()` is what gets saved next to every artifact, and
`Config.from_dict` reads it back unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deepkiln.model_args import PRESETS, TRAINING_FIELDS, ModelArgs
from deepkiln.tokenizer import MIN_VOCAB_SIZE


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class RunArgs(Section):
    name: str = "deepkiln"
    """Run name; artifacts go to <run_dir>/<name>."""
    run_dir: str = "runs"
    """Local folder or pyarrow.fs URI (s3://, gs://) that every stage reads and writes under."""
    seed: int = 0
    """Seed for data order, init and sampling."""

    @model_validator(mode="after")
    def _check(self) -> RunArgs:
        # The name is joined into every path and a fresh run deletes <run_dir>/<name>/... trees.
        name = self.name
        if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("~"):
            raise ValueError(f"run.name={name!r} must be a single folder name (no '/', no '..', not absolute): "
                             "artifacts go to <run_dir>/<run.name>")
        return self


class QualityArgs(Section):
    """Document filter thresholds: Gopher's (Rae et al. 2021) unless noted. Units are words, and
    each CJK character counts one."""
    min_units: int = Field(32, ge=1)
    """Fewest units a document may have (Gopher: 50 words)."""
    max_units: int = Field(2048, ge=1)
    """Most units a document may have (Gopher: 100,000 words)."""
    max_symbol_ratio: float = Field(0.1, ge=0)
    """Most ("#" + ellipses) per unit."""
    min_alpha_unit_ratio: float = Field(0.8, ge=0, le=1)
    """Least share of units holding an alphabetic character."""
    min_mean_word_len: float = Field(3.0, ge=0)
    """Mean non-CJK unit length, lower bound."""
    max_mean_word_len: float = Field(10.0, gt=0)
    """Mean non-CJK unit length, upper bound."""
    max_digit_ratio: float = Field(0.3, ge=0, le=1)
    """Most digits per non-space character (not Gopher's)."""
    max_bullet_line_ratio: float = Field(0.9, ge=0, le=1)
    """Most share of lines starting with a bullet."""
    max_ellipsis_line_ratio: float = Field(0.3, ge=0, le=1)
    """Most share of lines ending in an ellipsis."""
    max_dup_line_ratio: float = Field(0.3, ge=0, le=1)
    """Most share of lines repeating an earlier line."""
    max_dup_line_char_ratio: float = Field(0.2, ge=0, le=1)
    """Most share of line characters in repeated lines."""
    max_top_ngram_char_ratio: dict[int, float] = {2: 0.20, 3: 0.18, 4: 0.16}
    """n -> most share of unit characters in the most frequent n-gram."""
    max_dup_ngram_char_ratio: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    """n -> most share of unit characters covered by n-grams occurring more than once."""

    @model_validator(mode="after")
    def _check(self) -> QualityArgs:
        if self.min_units > self.max_units:
            raise ValueError(f"data.quality.min_units={self.min_units} exceeds data.quality.max_units={self.max_units}")
        if self.min_mean_word_len > self.max_mean_word_len:
            raise ValueError(f"data.quality.min_mean_word_len={self.min_mean_word_len} exceeds "
                             f"data.quality.max_mean_word_len={self.max_mean_word_len}")
        return self


class DataArgs(Section):
    input: str = "builtin"
    """Raw text: a file, folder or URI of txt/jsonl/parquet, or `builtin` for the built-in corpus."""
    text_field: str = "text"
    """Field holding the text in jsonl and Parquet inputs."""
    num_shards: int = Field(2, ge=1)
    """Shards, one ShardOwner actor each."""
    shard_cpus: float = Field(1.0, gt=0)
    """CPUs reserved by each ShardOwner actor (fractional is fine)."""
    remove_urls: bool = True
    """Strip http(s):// and www. URLs from the text."""
    strip_markup: bool = True
    """Remove terminal escape sequences (colour codes) whole and HTML remnants (tags by name, comments,
    script and style blocks), and decode HTML entities, before the other rules."""
    languages: list[str] = []
    """Keep only documents whose language (CLD2's ISO 639-1 code, Chinese in either script is `zh`;
    `und` where none is found) is listed; empty: keep every language. Each kept document records its
    `lang` and the share of its text in it, and the report counts them."""
    flagged_words: dict[str, str] = {}
    """Toxicity filter: {language: file of flagged words, one per line} (a local path or URI; `*`: a
    list applied to every language). Words of alphabetic scripts match whole words, case-insensitive;
    CJK entries match inside the text and count per character."""
    max_flagged_ratio: float = Field(0.02, ge=0, le=1)
    """Drop a document when flagged words cover more than this share of its units (words; CJK:
    characters)."""
    quality_reference: list[str] = []
    """Model-based quality: files or folders (local paths or URIs; txt, jsonl, parquet) of text the
    user trusts. A Kneser-Ney n-gram model of them gives every document a perplexity, stored with it
    (`ppl`, and its language's tercile `ppl_bucket`: head, middle, tail, as CCNet); empty: no model."""
    quality_order: int = Field(3, ge=1, le=6)
    """The n of that n-gram model (units: lower-cased words; CJK: characters)."""
    max_perplexity_percentile: float = Field(1.0, gt=0, le=1)
    """Drop documents whose perplexity is above this percentile of their language's (1.0 keeps
    every one); the report records each language's cut-offs."""
    splits: dict[Literal["train", "validation", "test"], float] = {"train": 0.98, "validation": 0.01, "test": 0.01}
    """Document-level split shares. Each kept document's split is fixed when it is prepared (the
    `split` column): documents are taken in the order of a keyed hash of their id (their duplicate
    cluster's representative), each stratum keeps every split within one document of its share, and a
    later generation continues the counts without moving any earlier document. Training trains on
    `train` and validates on `validation`; `test` is left for you."""
    split_by: Literal["lang", "source", "none"] = "lang"
    """The strata the splits are balanced within: the document's language, its source file (the
    input file it was read from), or none."""
    shingle_size: int = Field(5, ge=1)
    """MinHash shingle: this many consecutive words (CJK: characters)."""
    num_perm: int = Field(128, ge=1)
    """MinHash permutations (signature length)."""
    bands: int = Field(20, ge=1)
    """LSH bands; bands x rows must not exceed num_perm."""
    rows: int = Field(6, ge=1)
    """Signature values per LSH band."""
    near_dup_threshold: float = Field(0.7, gt=0, le=1)
    """MinHash candidate pairs are duplicates when their estimated Jaccard similarity reaches this."""
    near_dup_method: Literal["minhash", "simhash", "both"] = "both"
    """Near-duplicate search: MinHash with LSH bands (similar shingle sets), SimHash with a blocked
    search (near-exact copies, with a threshold that grows for short documents), or both (a pair
    either finds is a duplicate)."""
    simhash_distance: int = Field(3, ge=0, le=12)
    """SimHash: the Hamming distance (of 64 bits) within which two documents of 100 or more shingles
    are near duplicates; shorter ones get distance x sqrt(100 / shingles), up to simhash_max_distance."""
    simhash_max_distance: int = Field(6, ge=0, le=12)
    """SimHash: the largest threshold, for the shortest documents. The blocked search cuts the 64 bits
    into this + 2 blocks and has one table per pair of blocks (28 tables at 6)."""
    bucket_owners: int = Field(2, ge=1)
    """LshBucketOwner actors, each owning a slice of the band space."""
    quality: QualityArgs = Field(default_factory=QualityArgs)
    """Rule-based quality filter thresholds."""

    @field_validator("quality_reference", mode="before")
    @classmethod
    def _one_reference(cls, value):
        return [value] if isinstance(value, str) else value  # --data.quality_reference=trusted/ is one path

    @model_validator(mode="after")
    def _check(self) -> DataArgs:
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"data.bands x data.rows = {self.bands * self.rows} exceeds data.num_perm={self.num_perm}")
        if "train" not in self.splits or any(v < 0 for v in self.splits.values()) or \
                abs(sum(self.splits.values()) - 1) > 1e-6:
            raise ValueError(f"data.splits={self.splits}: needs a train share, no negative share, and shares "
                             f"summing to 1")
        if self.max_perplexity_percentile < 1 and not self.quality_reference:
            raise ValueError(f"data.max_perplexity_percentile={self.max_perplexity_percentile} needs "
                             f"data.quality_reference (the trusted text that scores documents)")
        if self.simhash_distance > self.simhash_max_distance:
            raise ValueError(f"data.simhash_distance={self.simhash_distance} exceeds "
                             f"data.simhash_max_distance={self.simhash_max_distance}")
        return self


class TokenizerArgs(Section):
    vocab_size: int = Field(4096, ge=MIN_VOCAB_SIZE)
    """SentencePiece vocabulary size; must not exceed model.vocab_size."""
    character_coverage: float = 0.9995
    """SentencePiece character coverage (about 0.9995 for CJK text)."""
    sample_docs: int = Field(20000, ge=1)
    """Documents drawn evenly from the prepared shards to train the tokenizer on."""


class TrainArgs(Section):
    steps: int = Field(200, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(8, ge=1)
    """Global batch, in sequences per optimizer step."""
    seq_len: int = Field(128, ge=1)
    """Training sequence length in tokens; must not exceed model.max_seq_len."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of lr."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    zero_stage: int = Field(0, ge=0, le=3)
    """DeepSpeed ZeRO stage, 0-3."""
    offload: bool = False
    """ZeRO CPU offload of the optimizer state (and, at stage 3, of the parameters); needs zero_stage >= 1."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass instead of keeping its activations."""
    seq_len_start: int = Field(0, ge=0)
    """Sequence-length curriculum: start at this many tokens and grow linearly to seq_len over
    curriculum_steps (multiples of 8); 0 trains at seq_len throughout."""
    curriculum_steps: int = Field(0, ge=0)
    """Steps over which the curriculum grows the sequence length to seq_len."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Training compute dtype (train, tune, online updates, DP fine-tune): auto is bfloat16 where the
    hardware has it natively (AMX or AVX-512 BF16 CPUs, recent GPUs) and float32 elsewhere."""
    num_workers: int = Field(2, ge=1)
    """Ray Train workers (DeepSpeed ranks)."""
    log_every: int = Field(10, ge=1)
    """Steps between progress lines."""
    checkpoint_every: int = Field(100, ge=1)
    """Steps between checkpoints."""
    eval_every: int = Field(50, ge=1)
    """Steps between validation-loss evaluations."""
    eval_batches: int = Field(4, ge=1)
    """Held-out batches per evaluation."""
    val_fraction: float = Field(0.05, gt=0, lt=1)
    """Share of the token windows held out for validation."""
    tokens: str = ""
    """Token shards folder; empty means <run_dir>/<run.name>/tokenizer/tokens."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs per Ray Train worker (torch threads follow it)."""
    max_failures: int = Field(2, ge=0)
    """Worker failures Ray Train recovers from (restarting from the last checkpoint)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Reported checkpoints kept in storage."""
    stop_after: int = Field(0, ge=0)
    """Stop (with a checkpoint) after this many steps, keeping the schedule of `steps`; 0 runs to the end."""
    resume: bool = False
    """Continue the run of the same name from its last checkpoint instead of starting fresh."""
    mixture: dict[str, float] = {}
    """Training mixture: {stratum: weight} (normalised), e.g. {zh: 0.45, en: 0.35, other: 0.2}. A
    stratum is a language code or a source file (train.mixture_by), or a glob of them ("wiki/*");
    `other` takes every document no other key names; without it, those are left out. Every batch
    keeps each stratum within one sample of its share; a small stratum repeats, a large one is
    subsampled. Training reports `loss/<stratum>` and `val_loss/<stratum>`. Empty: the token stream
    as it comes."""
    mixture_by: Literal["lang", "source"] = "lang"
    """What train.mixture's keys name: the document's language, or its source file (its path under data.input)."""

    @model_validator(mode="after")
    def _check(self) -> TrainArgs:
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size={self.batch_size} is not divisible by train.grad_accum={self.grad_accum}")
        if self.offload and self.zero_stage == 0:
            raise ValueError("train.offload=True needs train.zero_stage >= 1 (got 0): "
                             "ZeRO offloads the optimizer state it partitions")
        if self.seq_len_start and not 8 <= self.seq_len_start <= self.seq_len:
            raise ValueError(f"train.seq_len_start={self.seq_len_start} must be in 8..train.seq_len={self.seq_len}")
        bad = {k: w for k, w in self.mixture.items() if not (w > 0 and math.isfinite(w)) or not k}
        if bad:
            raise ValueError(f"train.mixture={self.mixture}: every key must be a non-empty stratum name and every "
                             f"weight a finite number > 0 (got {bad})")
        if self.seq_len_start and self.curriculum_steps < 1:
            raise ValueError(f"train.curriculum_steps={self.curriculum_steps} must be >= 1 with train.seq_len_start set")
        return self


class TuneArgs(Section):
    num_samples: int = Field(4, ge=1)
    """Trials."""
    max_steps: int = Field(50, ge=1)
    """Training steps per trial at most (ASHA stops the weak ones earlier)."""
    reports: int = Field(4, ge=1)
    """Validation-loss reports (and checkpoints) per trial: the rungs where ASHA may stop a trial."""
    max_failures: int = Field(1, ge=0)
    """Times a failed trial is retried, continuing from its own last checkpoint."""
    grace_period: int = Field(1, ge=1)
    """Reports every trial makes before ASHA may stop it."""

    @model_validator(mode="after")
    def _check(self) -> TuneArgs:
        if self.reports > self.max_steps:
            raise ValueError(f"tune.reports={self.reports} exceeds tune.max_steps={self.max_steps}")
        if self.grace_period > self.reports:
            raise ValueError(f"tune.grace_period={self.grace_period} exceeds tune.reports={self.reports}")
        return self


class PrivacyArgs(Section):
    enabled: bool = False
    """Differentially private fine-tune with Opacus (pipelines.dp_finetune always sets it)."""
    target_epsilon: float = Field(8.0, gt=0)
    """Privacy budget epsilon to spend over the whole fine-tune; a run stops before exceeding it."""
    delta: float = Field(1e-5, gt=0, lt=1)
    """Privacy delta; must be below 1 / the number of private examples (checked when they are read)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Per-sample gradient clip (the L2 norm each example's gradient is clipped to before noise)."""
    noise_multiplier: float = Field(0.0, ge=0)
    """Fixed noise std / max_grad_norm; 0: the smallest that spends exactly target_epsilon over
    `epochs` (Opacus make_private_with_epsilon)."""
    accountant: Literal["prv", "rdp"] = "prv"
    """Opacus privacy accountant: prv (tighter, Opacus' default) or rdp (about 3x faster to query)."""
    epochs: int = Field(1, ge=1)
    """Planned passes over the private set; with Poisson sampling one pass is N / batch_size steps."""
    batch_size: int = Field(16, ge=1)
    """Expected examples per step: each example joins a step with probability batch_size / N."""
    lr: float = Field(1e-3, gt=0)
    """AdamW learning rate of the fine-tune (constant)."""
    params: Literal["lora", "full"] = "lora"
    """What trains: LoRA adapters (lora section) or the full weights; MoE and MTP layers stay frozen."""
    data: str = ""
    """Private text: a jsonl or Parquet file with a data.text_field column; empty: the tokenizer
    stage's token windows (a stand-in that makes the stage runnable on the built-in corpus)."""
    user_field: str = ""
    """Column naming each record's user: a user's records become one example, so the guarantee
    covers a user; empty: the unit is one record (or one token window)."""
    max_examples: int = Field(1024, ge=0)
    """Private training examples used at most (a seeded sample); 0: all of them."""
    checkpoint_every: int = Field(50, ge=1)
    """Steps between saved states (model, optimizer, accountant)."""
    stop_after: int = Field(0, ge=0)
    """Stop (with a saved state) after this many steps in total; 0: run the plan. A later run resumes."""
    noise_seed: int = -1
    """Seed of the noise and the Poisson sampling; -1: fresh OS entropy, as the guarantee needs (a
    known seed makes the noise known). Set it only for reproducible tests."""


class FairnessArgs(Section):
    model: str = ""
    """Checkpoint pipelines.audit reads; empty: <run_dir>/<run.name>/train/model."""
    attributes: list[Literal["gender", "nationality"]] = ["gender", "nationality"]
    """Built-in sensitive attributes whose templated prompts are audited."""
    languages: list[Literal["en", "zh"]] = ["en", "zh"]
    """Languages of the built-in templates and terms."""
    data: str = ""
    """Extra audit prompts: a jsonl file with group_field and prompt_field (and optionally
    continuation_field) per row, audited as one more attribute."""
    group_field: str = Field("group", min_length=1)
    """Field naming each audit example's sensitive group."""
    prompt_field: str = Field("prompt", min_length=1)
    """Field holding each audit example's prompt."""
    continuation_field: str = "continuation"
    """Field holding a neutral continuation to score; rows without it use the built-in ones."""
    outcome_words: list[str] = []
    """Words whose presence in a generation counts as the audited outcome; empty: the built-in
    negative lexicon (English and Chinese)."""
    generations: int = Field(4, ge=1)
    """Sampled continuations per prompt (temperature 1, seeded from run.seed)."""
    max_new_tokens: int = Field(12, ge=1)
    """Tokens generated per continuation at most."""
    max_perplexity_ratio: float = Field(1.5, ge=0)
    """Gate: worst group perplexity / best group perplexity at most this."""
    max_outcome_difference: float = Field(0.2, ge=0)
    """Gate: highest minus lowest group rate of the outcome at most this."""
    max_perplexity: float = Field(0.0, ge=0)
    """Gate: held-out perplexity at most this; 0: no limit."""

    @model_validator(mode="after")
    def _check(self) -> FairnessArgs:
        if not (self.attributes and self.languages) and not self.data:
            raise ValueError(f"fairness.attributes={self.attributes} and fairness.languages={self.languages} "
                             "leave nothing to audit: name at least one of each, or fairness.data")
        return self


class QuantArgs(Section):
    format: Literal["bf16", "int8", "nf4"] = "nf4"
    """Serving weight format."""
    keep: list[str] = ["embed", "head", "gate"]
    """Module names left unquantized (stored in bf16, computed in serve.dtype)."""
    source: str = ""
    """Checkpoint pipelines.quantize reads; empty: <run_dir>/<run.name>/train/model."""
    double_quant: bool = False
    """nf4: quantize the per-block scales too (saves 0.4 bit/weight; adds a 1 KiB table per layer)."""


class ServeArgs(Section):
    host: str = "127.0.0.1"
    """HTTP bind address."""
    port: int = Field(8000, ge=0, le=65535)
    """HTTP port."""
    model_name: str = "deepkiln"
    """Model id clients name in requests and see in /v1/models."""
    artifact: str = ""
    """Quantized artifact the replicas load; empty: <run_dir>/<run.name>/quantize/<quant.format>."""
    tokenizer: str = ""
    """Tokenizer model file; empty: <run_dir>/<run.name>/tokenizer/tokenizer.model."""
    replicas: int = Field(1, ge=1)
    """LLMServer replicas."""
    replica_cpus: float = Field(1.0, gt=0)
    """CPUs per LLMServer replica."""
    torch_threads: int = Field(1, ge=0)
    """Intra-op threads of a replica's engine thread; 0: one per replica CPU. Steps run off the
    main thread, where PyTorch's OpenMP pays 2-2.5x per step with 2 threads on the tiny model
    (bench/serve.py notes); 1 thread leaves the replica's other cores to HTTP and tokenizing."""
    max_batch: int = Field(8, ge=1)
    """Sequences decoded together by one replica."""
    max_step_tokens: int = Field(0, ge=0)
    """Tokens one engine step computes at most (decodes + prefills); 0: the context length."""
    stream_interval_ms: float = Field(50.0, ge=0)
    """A request's tokens go out together at most this often (the first and last at once): fewer,
    fuller messages through Serve under load; 0: every engine step."""
    max_queue: int = Field(64, ge=1)
    """Requests waiting for a batch slot per replica; beyond it: 503 with Retry-After."""
    response_cache: int = Field(0, ge=0)
    """Finished deterministic generations (greedy, or seeded) a replica keeps, keyed on model
    version, prompt and sampling parameters, and answers again without the engine (LRU); 0: off."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Inference compute dtype (the serving engine and its bitsandbytes layers, the evaluations of
    quantize, audit and the online gate); artifacts store bf16 whatever it is. auto: as train.dtype."""
    max_tokens: int = Field(256, ge=1)
    """Default and upper bound on completion tokens per request."""
    max_n: int = Field(4, ge=1)
    """Upper bound on completions per request (`n`)."""
    max_body_bytes: int = Field(1 << 20, ge=1)
    """Largest request body accepted; beyond it: 413."""
    request_timeout_s: float = Field(60.0, gt=0)
    """A request not finished in this time gets 408 and its generation is cancelled."""
    api_key_env: str = "DEEPKILN_API_KEY"
    """Environment variable holding the API key, read where the app is deployed; unset or empty: no key."""
    api_key_file: str = ""
    """File holding the API keys, one per line, one per client ('#' comments; wins over the
    environment variable); read where the app is deployed. Set but missing, unreadable or empty: the
    app refuses to start. Feedback is attributed to the key that posted it (its hash)."""
    allow_unauthenticated: bool = False
    """Serve on a non-loopback serve.host without an API key (otherwise the app refuses to start)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of the Serve controller, proxy and replicas (their log files and the console; INFO
    includes a line per request). The quickstart runs with WARNING."""

    @model_validator(mode="after")
    def _check(self) -> ServeArgs:
        if self.max_step_tokens and self.max_step_tokens < self.max_batch:
            raise ValueError(f"serve.max_step_tokens={self.max_step_tokens} must be 0 or >= serve.max_batch={self.max_batch}")
        return self


class FeedbackArgs(Section):
    store: str = ""
    """Folder of the collectors' SQLite files (a local path: SQLite needs a real file system);
    empty: <run_dir>/<run.name>/feedback."""
    collectors: int = Field(1, ge=1)
    """FeedbackCollector actors: a completion is kept by the one its id hashes to, feedback stored by
    the one its feedback_id hashes to."""
    rating_min: int = 1
    """Lowest rating on the scale (thumbs down counts as rating_min)."""
    rating_max: int = 5
    """Highest rating on the scale (thumbs up counts as rating_max)."""
    max_text_chars: int = Field(8000, ge=1)
    """Longest corrected answer, and longest tag list, accepted (in characters)."""
    retention: int = Field(10000, ge=1)
    """Completions kept per collector for feedback to refer to; older ones are forgotten."""
    retention_s: float = Field(7 * 86400.0, gt=0)
    """Seconds a completion is kept for feedback to refer to (beside the count bound); older ones are forgotten."""

    @model_validator(mode="after")
    def _check(self) -> FeedbackArgs:
        if self.rating_min >= self.rating_max:
            raise ValueError(f"feedback.rating_min={self.rating_min} must be below feedback.rating_max={self.rating_max}")
        return self


class LoraArgs(Section):
    rank: int = Field(8, ge=1)
    """Rank of each low-rank update."""
    alpha: float = Field(16.0, gt=0)
    """Update scale numerator: the update is multiplied by alpha / rank."""
    targets: list[str] = ["wq", "wq_a", "wq_b", "wkv_a", "wo", "w1", "w2", "w3"]
    """Names of the nn.Linear layers that get adapters (MLA's wkv_b is read as a matrix at decode:
    leave it out unless the adapters are merged before serving, as the pipelines do)."""


class OnlineArgs(Section):
    buffer_size: int = Field(10000, ge=1)
    """Replay buffer capacity in unconsumed examples; beyond it the lowest-priority ones are dropped."""
    half_life_s: float = Field(86400.0, gt=0)
    """Recency half-life of an example's priority (priority = weight x 0.5 ** (age / half_life_s))."""
    feedback_fraction: float = Field(0.25, ge=0, le=1)
    """Share of each update batch drawn from feedback rather than base data (against forgetting; at
    0.5 an update of the tiny model raised held-out perplexity by 20%, at 0.25 it did not)."""
    min_feedback: int = Field(8, ge=1)
    """Unconsumed feedback examples that trigger an update."""
    max_feedback: int = Field(256, ge=1)
    """Feedback examples one update draws at most."""
    method: Literal["lora", "full", "dpo", "kto", "grpo"] = "lora"
    """What an update learns from and how: `lora` and `full` fine-tune on corrections and well-rated
    answers (supervised) through LoRA adapters (merged afterwards) or all weights; `dpo` learns from
    preference pairs, `kto` from answers labelled desirable or undesirable, `grpo` from its own
    answers to the feedback's prompts scored by rewards, through `online.params`."""
    params: Literal["lora", "full"] = "lora"
    """The weights a dpo, kto or grpo update trains: LoRA adapters (merged afterwards) or all of them."""
    beta: float = Field(0.1, gt=0)
    """DPO's and KTO's beta: how far the update may move from the serving version (its reference);
    smaller lets it move further."""
    desirable_min: int | None = None
    """Ratings at or above it label a completion desirable (KTO); unset: those above the scale's middle."""
    undesirable_max: int | None = None
    """Ratings at or below it label a completion undesirable (KTO); unset: those below the scale's middle."""
    group_size: int = Field(4, ge=2)
    """GRPO: answers sampled per prompt; each is judged against its group's mean reward."""
    max_new_tokens: int = Field(32, ge=1)
    """GRPO: longest sampled answer, in tokens."""
    temperature: float = Field(1.0, gt=0)
    """GRPO: sampling temperature of the rollouts."""
    iterations: int = Field(2, ge=1)
    """GRPO: optimizer steps on each rollout (the probability ratio to the rollout's policy moves from 1
    after the first)."""
    clip: float = Field(0.2, gt=0, lt=1)
    """GRPO: the probability ratio is clipped to [1 - clip, 1 + clip] in the surrogate objective."""
    kl_coef: float = Field(0.04, ge=0)
    """GRPO: weight of the KL penalty to the serving version (the reference)."""
    reward_model: str = "latest"
    """GRPO: the reward model scoring the rollouts: a folder written by pipelines.reward, `latest` (the
    run's newest, if any), or empty for none (then online.rule_rewards alone)."""
    rule_rewards: list[Literal["short", "stop"]] = []
    """GRPO: rule-based rewards added to the reward model's: `short` (1 - length / max_new_tokens),
    `stop` (1 when the answer ends with its stop token rather than at the length limit)."""
    prompts: str = ""
    """GRPO: a file of prompts (one per line, or jsonl with "prompt") rolled out beside the feedback's."""
    steps: int = Field(40, ge=1)
    """Optimizer steps per update."""
    batch_size: int = Field(8, ge=1)
    """Sequences per update step (feedback and base together)."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate of an update (constant after a short warmup). On the quickstart's tiny
    model 1e-3 halved the corrected answers' loss gap for +4% held-out perplexity; 3e-3 cost +9%."""
    num_workers: int = Field(1, ge=1)
    """DeepSpeed ranks of an update: a Ray Train worker group, or for 1 a Ray task holding one worker's
    resources (a worker group's process starts cost about 10 s, more than a small update's steps)."""
    max_ppl_increase: float = 0.05
    """Gate: the candidate's held-out perplexity may exceed the serving version's by this fraction at most."""
    max_preference_drop: float = 0.05
    """Gate: the candidate's preference accuracy may fall below the serving version's by this much at most."""
    preference_set: str = ""
    """jsonl of {"prompt", "chosen", "rejected"} the gate scores; empty: built from held-out text
    (a real continuation against a shuffled one)."""
    preference_pairs: int = Field(32, ge=1)
    """Pairs in the built-in preference set."""
    poll_s: float = Field(10.0, gt=0)
    """How often the long-running loop looks for new feedback."""
    max_share_per_source: float = Field(1.0, gt=0, le=1)
    """Largest share of one update's feedback examples that may come from one client (the API key
    that posted them; without keys every client is one source); the rest wait for later updates."""
    publish: bool = True
    """Publish a version that passed the gate to the running Serve application (only its artifact changes)."""
    keep_versions: int = Field(5, ge=1)
    """Versions kept on disk under online/versions/ besides the one served: the last keep_versions
    served (what --rollback can return to) and the newest keep_versions made; older ones are deleted."""

    @model_validator(mode="after")
    def _check(self) -> OnlineArgs:
        if self.min_feedback > self.max_feedback:
            raise ValueError(f"online.min_feedback={self.min_feedback} exceeds online.max_feedback={self.max_feedback}")
        if self.batch_size % self.num_workers:
            raise ValueError(f"online.batch_size={self.batch_size} is not divisible by online.num_workers={self.num_workers}")
        if self.method == "lora" and self.params == "full":  # (params=lora is the default: method=full wins)
            raise ValueError("online.params=full contradicts online.method=lora: a supervised update's method "
                             "names its weights (online.method=full; online.params is for dpo, kto and grpo)")
        if (self.desirable_min is not None and self.undesirable_max is not None
                and self.desirable_min <= self.undesirable_max):
            raise ValueError(f"online.desirable_min={self.desirable_min} must exceed "
                             f"online.undesirable_max={self.undesirable_max}")
        return self


class RewardArgs(Section):
    pairs: str = ""
    """jsonl of {"prompt", "chosen", "rejected"} (and an optional "margin" >= 0) a reward model learns
    from beside the feedback's pairs and labels; empty: the feedback alone."""
    steps: int = Field(100, ge=1)
    """Optimizer steps of pipelines.reward."""
    batch_size: int = Field(8, ge=1)
    """Pairs (and as many labelled answers, when there are) per step."""
    lr: float = Field(1e-4, gt=0)
    """Learning rate of the backbone; the score head learns at 10x."""
    holdout_fraction: float = Field(0.2, ge=0, lt=1)
    """Share of prompts (with all their pairs) held out to measure pair accuracy."""


class Config(Section):
    run: RunArgs = Field(default_factory=RunArgs)
    data: DataArgs = Field(default_factory=DataArgs)
    tokenizer: TokenizerArgs = Field(default_factory=TokenizerArgs)
    model: ModelArgs = Field(default_factory=lambda: PRESETS["tiny"].model_copy())
    train: TrainArgs = Field(default_factory=TrainArgs)
    tune: TuneArgs = Field(default_factory=TuneArgs)
    privacy: PrivacyArgs = Field(default_factory=PrivacyArgs)
    fairness: FairnessArgs = Field(default_factory=FairnessArgs)
    quant: QuantArgs = Field(default_factory=QuantArgs)
    lora: LoraArgs = Field(default_factory=LoraArgs)
    serve: ServeArgs = Field(default_factory=ServeArgs)
    feedback: FeedbackArgs = Field(default_factory=FeedbackArgs)
    online: OnlineArgs = Field(default_factory=OnlineArgs)
    reward: RewardArgs = Field(default_factory=RewardArgs)

    @model_validator(mode="before")
    @classmethod
    def _expand_model_preset(cls, data: Any) -> Any:
        # `model: {preset: small, n_layers: 4}` starts from the named preset, then applies the keys;
        # `model.init: FOLDER` takes the shape from the folder's config.json, keeping the training keys.
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            model = dict(data["model"])
            preset = model.pop("preset", "tiny")
            if preset not in PRESETS:
                raise ValueError(f"model.preset={preset!r} is not one of {sorted(PRESETS)}")
            shape = PRESETS[preset].model_dump()
            if model.get("init"):
                from deepkiln.hf_config import read_hf_args

                shape = read_hf_args(model["init"]).model_dump()
                model = {k: v for k, v in model.items() if k in TRAINING_FIELDS}
            data = {**data, "model": {**shape, **model}}
        return data

    @model_validator(mode="after")
    def _check_across_sections(self) -> Config:
        t, m = self.train, self.model
        if self.privacy.enabled and t.zero_stage > 0:
            raise ValueError(f"privacy.enabled=True needs train.zero_stage=0 (got {t.zero_stage}): "
                             "Opacus does not support DeepSpeed ZeRO")
        if t.seq_len > m.max_seq_len:
            raise ValueError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
        f, on = self.feedback, self.online
        if on.method == "grpo" and on.params == "full" and t.zero_stage == 3:
            raise ValueError("online.method=grpo with online.params=full needs train.zero_stage below 3: its rollouts "
                             "sample from a whole copy of the weights")
        for key, cut in (("desirable_min", on.desirable_min), ("undesirable_max", on.undesirable_max)):
            if cut is not None and not f.rating_min <= cut <= f.rating_max:
                raise ValueError(f"online.{key}={cut} is outside the rating scale "
                                 f"feedback.rating_min={f.rating_min}..feedback.rating_max={f.rating_max}")
        low, high = rating_cuts(f, on)
        if low >= high:
            raise ValueError(f"online.undesirable_max ({low}) must be below online.desirable_min ({high}) "
                             f"on the scale {f.rating_min}..{f.rating_max}")
        if self.tokenizer.vocab_size > m.vocab_size and not m.init:  # an imported model brings its tokenizer
            raise ValueError(f"tokenizer.vocab_size={self.tokenizer.vocab_size} exceeds model.vocab_size={m.vocab_size}")
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        return _validate(data)


def rating_cuts(scale: FeedbackArgs, online: OnlineArgs) -> tuple[float, float]:
    """(undesirable_max, desirable_min): ratings at or below the first label a completion undesirable,
    at or above the second desirable. Unset, they are the ratings below / above the scale's middle."""
    middle = (scale.rating_min + scale.rating_max) / 2
    low = online.undesirable_max if online.undesirable_max is not None else math.ceil(middle) - 1
    high = online.desirable_min if online.desirable_min is not None else math.floor(middle) + 1
    return low, high


def _validate(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except pydantic.ValidationError as e:
        raise ValueError("invalid config: " + "; ".join(map(_describe_error, e.errors()))) from None


_LIMITS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"), "less_than_equal": ("le", "<="),
           "less_than": ("lt", "<")}


def _describe_error(err: dict) -> str:
    """One line per problem, naming the dotted key: "serve.max_queue=0 must be >= 1", or pydantic's
    own words with the value ("train.lr: Input should be a valid number (got 'fast')"); a section's
    cross-field check already names its keys."""
    key = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] in _LIMITS:
        bound, op = _LIMITS[err["type"]]
        limit = err["ctx"][bound]
        return f"{key}={err['input']} must be {op} {int(limit) if float(limit).is_integer() else limit}"
    if err["type"] == "value_error":
        return str(err["ctx"]["error"])
    got = f" (got {err['input']!r})" if err["type"] != "missing" and "input" in err else ""
    return f"{key}: {err['msg']}{got}"


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ValueError(f"--{key}: {p} is not a config section")
        node = child
    node[leaf] = value


def parse_overrides(argv: list[str]) -> tuple[str | None, dict]:
    """Split argv into the --config path and a nested dict of --a.b=v overrides (values as strings)."""
    path, overrides, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: use --config FILE and --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"--{key} needs a value")
            value, i = argv[i + 1], i + 1
        if key == "config":
            path = value
        else:
            # Lists and mappings come as YAML flow syntax ("[a, b]"); scalars stay strings and are cast
            # by the declared field type, so "1e-3" is a float and "on" is not silently a bool.
            _set_dotted(overrides, key, yaml.safe_load(value) if value.startswith(("[", "{")) else value)
        i += 1
    return path, overrides


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def describe() -> str:
    """Every key with its default and doc: what --help prints."""
    cfg = Config()
    lines = ["usage: --config FILE.yaml --section.key=value ...",
             "model.preset picks a named model shape: " + ", ".join(PRESETS)]

    def keys(section: BaseModel, prefix: str) -> None:
        for key, info in type(section).model_fields.items():
            value = getattr(section, key)
            if isinstance(value, BaseModel) and not isinstance(value, ModelArgs):
                keys(value, f"{prefix}.{key}")
            else:
                lines.append(f"  --{prefix}.{key}={value!r}  {info.description or ''}")

    for name in Config.model_fields:
        lines.append(f"{name}:")
        keys(getattr(cfg, name), name)
    return "\n".join(lines)


def load_config(argv: list[str] | None = None) -> Config:
    """Defaults < YAML file named by --config < dotted --section.key=value overrides.
    `--help` prints every key and exits."""
    argv = list(argv or [])
    if "--help" in argv or "-h" in argv:
        print(describe())
        raise SystemExit(0)
    path, overrides = parse_overrides(argv)
    data: dict = {}
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"--config {path}: no such file")
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"--config {path}: expected a mapping of sections, got {type(data).__name__}")
    return _validate(_merge(data, overrides))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
