"""One typed config tree for every stage, loaded from defaults < YAML preset < dotted CLI overrides.

    cfg = load_config(["--config", "configs/tiny.yaml", "--train.lr=3e-4"])

Every section is a pydantic model that forbids unknown keys and casts values by their declared
type (PyYAML reads `1e-3` as a string; the CLI gives strings). Errors are `ValueError`s naming the
dotted key and the value. `cfg.to_dict()` is what gets saved next to every artifact, and
`Config.from_dict` reads it back unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from deepkiln.model import PRESETS, ModelArgs
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


class DataArgs(Section):
    input: str = "builtin"
    """Raw text: a file, folder or URI of txt/jsonl/parquet, or `builtin` for the built-in corpus."""
    text_field: str = "text"
    """Field holding the text in jsonl and Parquet inputs."""
    num_shards: int = 2
    """Shards, one ShardOwner actor each."""
    shard_cpus: float = 1.0
    """CPUs reserved by each ShardOwner actor (fractional is fine)."""
    min_units: int = 32
    """Length filter: fewest words (CJK characters count one each) a document may have."""
    max_units: int = 2048
    """Length filter: most words a document may have."""
    remove_urls: bool = True
    """Strip http(s):// and www. URLs from the text."""
    shingle_size: int = 5
    """MinHash shingle: this many consecutive words (CJK: characters)."""
    num_perm: int = 128
    """MinHash permutations (signature length)."""
    bands: int = 20
    """LSH bands; bands x rows must not exceed num_perm."""
    rows: int = 6
    """Signature values per LSH band."""
    near_dup_threshold: float = 0.7
    """Candidate pairs are duplicates when their estimated Jaccard similarity reaches this."""
    bucket_owners: int = 2
    """LshBucketOwner actors, each owning a slice of the band space."""


class TokenizerArgs(Section):
    vocab_size: int = 4096
    """SentencePiece vocabulary size; must not exceed model.vocab_size."""
    character_coverage: float = 0.9995
    """SentencePiece character coverage (about 0.9995 for CJK text)."""
    sample_docs: int = 20000
    """Documents drawn evenly from the prepared shards to train the tokenizer on."""


class TrainArgs(Section):
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 8
    """Global batch, in sequences per optimizer step."""
    seq_len: int = 128
    """Training sequence length in tokens; must not exceed model.max_seq_len."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of lr."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage, 0-3."""
    offload: bool = False
    """ZeRO CPU offload of the optimizer state (and, at stage 3, of the parameters); needs zero_stage >= 1."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass instead of keeping its activations."""
    seq_len_start: int = 0
    """Sequence-length curriculum: start at this many tokens and grow linearly to seq_len over
    curriculum_steps (multiples of 8); 0 trains at seq_len throughout."""
    curriculum_steps: int = 0
    """Steps over which the curriculum grows the sequence length to seq_len."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Training compute dtype (train, tune, online updates, DP fine-tune): auto is bfloat16 where the
    hardware has it natively (AMX or AVX-512 BF16 CPUs, recent GPUs) and float32 elsewhere."""
    num_workers: int = 2
    """Ray Train workers (DeepSpeed ranks)."""
    log_every: int = 10
    """Steps between progress lines."""
    checkpoint_every: int = 100
    """Steps between checkpoints."""
    eval_every: int = 50
    """Steps between validation-loss evaluations."""
    eval_batches: int = 4
    """Held-out batches per evaluation."""
    val_fraction: float = 0.05
    """Share of the token windows held out for validation."""
    tokens: str = ""
    """Token shards folder; empty means <run_dir>/<run.name>/tokenizer/tokens."""
    cpus_per_worker: float = 1.0
    """CPUs per Ray Train worker (torch threads follow it)."""
    max_failures: int = 2
    """Worker failures Ray Train recovers from (restarting from the last checkpoint)."""
    keep_checkpoints: int = 2
    """Reported checkpoints kept in storage."""
    stop_after: int = 0
    """Stop (with a checkpoint) after this many steps, keeping the schedule of `steps`; 0 runs to the end."""
    resume: bool = False
    """Continue the run of the same name from its last checkpoint instead of starting fresh."""


class TuneArgs(Section):
    num_samples: int = 4
    """Trials."""
    max_steps: int = 50
    """Training steps per trial at most (ASHA stops the weak ones earlier)."""
    reports: int = 4
    """Validation-loss reports (and checkpoints) per trial: the rungs where ASHA may stop a trial."""
    max_failures: int = 1
    """Times a failed trial is retried, continuing from its own last checkpoint."""


class PrivacyArgs(Section):
    enabled: bool = False
    """Differentially private fine-tune with Opacus (pipelines.dp_finetune always sets it)."""
    target_epsilon: float = 8.0
    """Privacy budget epsilon to spend over the whole fine-tune; a run stops before exceeding it."""
    delta: float = 1e-5
    """Privacy delta; must be below 1 / the number of private examples (checked when they are read)."""
    max_grad_norm: float = 1.0
    """Per-sample gradient clip (the L2 norm each example's gradient is clipped to before noise)."""
    noise_multiplier: float = 0.0
    """Fixed noise std / max_grad_norm; 0: the smallest that spends exactly target_epsilon over
    `epochs` (Opacus make_private_with_epsilon)."""
    accountant: Literal["prv", "rdp"] = "prv"
    """Opacus privacy accountant: prv (tighter, Opacus' default) or rdp (about 3x faster to query)."""
    epochs: int = 1
    """Planned passes over the private set; with Poisson sampling one pass is N / batch_size steps."""
    batch_size: int = 16
    """Expected examples per step: each example joins a step with probability batch_size / N."""
    lr: float = 1e-3
    """AdamW learning rate of the fine-tune (constant)."""
    params: Literal["lora", "full"] = "lora"
    """What trains: LoRA adapters (lora section) or the full weights; MoE and MTP layers stay frozen."""
    data: str = ""
    """Private text: a jsonl or Parquet file with a data.text_field column; empty: the tokenizer
    stage's token windows (a stand-in that makes the stage runnable on the built-in corpus)."""
    user_field: str = ""
    """Column naming each record's user: a user's records become one example, so the guarantee
    covers a user; empty: the unit is one record (or one token window)."""
    max_examples: int = 1024
    """Private training examples used at most (a seeded sample); 0: all of them."""
    checkpoint_every: int = 50
    """Steps between saved states (model, optimizer, accountant)."""
    stop_after: int = 0
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
    group_field: str = "group"
    """Field naming each audit example's sensitive group."""
    prompt_field: str = "prompt"
    """Field holding each audit example's prompt."""
    continuation_field: str = "continuation"
    """Field holding a neutral continuation to score; rows without it use the built-in ones."""
    outcome_words: list[str] = []
    """Words whose presence in a generation counts as the audited outcome; empty: the built-in
    negative lexicon (English and Chinese)."""
    generations: int = 4
    """Sampled continuations per prompt (temperature 1, seeded from run.seed)."""
    max_new_tokens: int = 12
    """Tokens generated per continuation at most."""
    max_perplexity_ratio: float = 1.5
    """Gate: worst group perplexity / best group perplexity at most this."""
    max_outcome_difference: float = 0.2
    """Gate: highest minus lowest group rate of the outcome at most this."""
    max_perplexity: float = 0.0
    """Gate: held-out perplexity at most this; 0: no limit."""


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
    port: int = 8000
    """HTTP port."""
    model_name: str = "deepkiln"
    """Model id clients name in requests and see in /v1/models."""
    artifact: str = ""
    """Quantized artifact the replicas load; empty: <run_dir>/<run.name>/quantize/<quant.format>."""
    tokenizer: str = ""
    """Tokenizer model file; empty: <run_dir>/<run.name>/tokenizer/tokenizer.model."""
    replicas: int = 1
    """LLMServer replicas."""
    replica_cpus: float = 1.0
    """CPUs per LLMServer replica."""
    torch_threads: int = 1
    """Intra-op threads of a replica's engine thread; 0: one per replica CPU. Steps run off the
    main thread, where PyTorch's OpenMP pays 2-2.5x per step with 2 threads on the tiny model
    (bench/serve.py notes); 1 thread leaves the replica's other cores to HTTP and tokenizing."""
    max_batch: int = 8
    """Sequences decoded together by one replica."""
    max_step_tokens: int = 0
    """Tokens one engine step computes at most (decodes + prefills); 0: the context length."""
    stream_interval_ms: float = 50.0
    """A request's tokens go out together at most this often (the first and last at once): fewer,
    fuller messages through Serve under load; 0: every engine step."""
    max_queue: int = 64
    """Requests waiting for a batch slot per replica; beyond it: 503 with Retry-After."""
    response_cache: int = 0
    """Finished deterministic generations (greedy, or seeded) a replica keeps, keyed on model
    version, prompt and sampling parameters, and answers again without the engine (LRU); 0: off."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Inference compute dtype (the serving engine and its bitsandbytes layers, the evaluations of
    quantize, audit and the online gate); artifacts store bf16 whatever it is. auto: as train.dtype."""
    max_tokens: int = 256
    """Default and upper bound on completion tokens per request."""
    max_n: int = 4
    """Upper bound on completions per request (`n`)."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted; beyond it: 413."""
    request_timeout_s: float = 60.0
    """A request not finished in this time gets 408 and its generation is cancelled."""
    api_key_env: str = "DEEPKILN_API_KEY"
    """Environment variable holding the API key; unset or empty: no key."""
    api_key_file: str = ""
    """File holding the API key (wins over the environment variable)."""


class FeedbackArgs(Section):
    store: str = ""
    """Folder of the collectors' SQLite files (a local path: SQLite needs a real file system);
    empty: <run_dir>/<run.name>/feedback."""
    collectors: int = 1
    """FeedbackCollector actors; a completion, and the feedback on it, go to the one its id hashes to."""
    rating_min: int = 1
    """Lowest rating on the scale (thumbs down counts as rating_min)."""
    rating_max: int = 5
    """Highest rating on the scale (thumbs up counts as rating_max)."""
    max_text_chars: int = 8000
    """Longest corrected answer, and longest tag list, accepted (in characters)."""
    retention: int = 10000
    """Completions kept per collector for feedback to refer to; older ones are forgotten."""


class LoraArgs(Section):
    rank: int = 8
    """Rank of each low-rank update."""
    alpha: float = 16.0
    """Update scale numerator: the update is multiplied by alpha / rank."""
    targets: list[str] = ["wq", "wq_a", "wq_b", "wkv_a", "wo", "w1", "w2", "w3"]
    """Names of the nn.Linear layers that get adapters (MLA's wkv_b is read as a matrix at decode:
    leave it out unless the adapters are merged before serving, as the pipelines do)."""


class OnlineArgs(Section):
    buffer_size: int = 10000
    """Replay buffer capacity in unconsumed examples; beyond it the lowest-priority ones are dropped."""
    half_life_s: float = 86400.0
    """Recency half-life of an example's priority (priority = weight x 0.5 ** (age / half_life_s))."""
    feedback_fraction: float = 0.25
    """Share of each update batch drawn from feedback rather than base data (against forgetting; at
    0.5 an update of the tiny model raised held-out perplexity by 20%, at 0.25 it did not)."""
    min_feedback: int = 8
    """Unconsumed feedback examples that trigger an update."""
    max_feedback: int = 256
    """Feedback examples one update draws at most."""
    method: Literal["lora", "full"] = "lora"
    """Update the model through LoRA adapters (merged afterwards) or all its weights."""
    steps: int = 40
    """Optimizer steps per update."""
    batch_size: int = 8
    """Sequences per update step (feedback and base together)."""
    lr: float = 1e-3
    """Peak learning rate of an update (constant after a short warmup). On the quickstart's tiny
    model 1e-3 halved the corrected answers' loss gap for +4% held-out perplexity; 3e-3 cost +9%."""
    num_workers: int = 1
    """DeepSpeed ranks (Ray Train workers) of an update."""
    max_ppl_increase: float = 0.05
    """Gate: the candidate's held-out perplexity may exceed the serving version's by this fraction at most."""
    max_preference_drop: float = 0.05
    """Gate: the candidate's preference accuracy may fall below the serving version's by this much at most."""
    preference_set: str = ""
    """jsonl of {"prompt", "chosen", "rejected"} the gate scores; empty: built from held-out text
    (a real continuation against a shuffled one)."""
    preference_pairs: int = 32
    """Pairs in the built-in preference set."""
    poll_s: float = 10.0
    """How often the long-running loop looks for new feedback."""
    publish: bool = True
    """Reconfigure the running Serve application with a version that passed the gate."""


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

    @model_validator(mode="before")
    @classmethod
    def _expand_model_preset(cls, data: Any) -> Any:
        # `model: {preset: small, n_layers: 4}` starts from the named preset, then applies the keys.
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            model = dict(data["model"])
            preset = model.pop("preset", "tiny")
            if preset not in PRESETS:
                raise ValueError(f"model.preset={preset!r} is not one of {sorted(PRESETS)}")
            data = {**data, "model": {**PRESETS[preset].model_dump(), **model}}
        return data

    @model_validator(mode="after")
    def _check_combinations(self) -> Config:
        t, m = self.train, self.model
        if self.privacy.enabled and t.zero_stage > 0:
            raise ValueError(f"privacy.enabled=True needs train.zero_stage=0 (got {t.zero_stage}): "
                             "Opacus does not support DeepSpeed ZeRO")
        pv, fa = self.privacy, self.fairness
        if not 0 < pv.delta < 1:
            raise ValueError(f"privacy.delta={pv.delta} must be in (0, 1)")
        for key in ("target_epsilon", "max_grad_norm", "lr"):
            if getattr(pv, key) <= 0:
                raise ValueError(f"privacy.{key}={getattr(pv, key)} must be > 0")
        for key in ("epochs", "batch_size", "checkpoint_every"):
            if getattr(pv, key) < 1:
                raise ValueError(f"privacy.{key}={getattr(pv, key)} must be >= 1")
        for key in ("noise_multiplier", "max_examples", "stop_after"):
            if getattr(pv, key) < 0:
                raise ValueError(f"privacy.{key}={getattr(pv, key)} must be >= 0")
        for key in ("max_perplexity_ratio", "max_outcome_difference", "max_perplexity"):
            if getattr(fa, key) < 0:
                raise ValueError(f"fairness.{key}={getattr(fa, key)} must be >= 0")
        for key in ("generations", "max_new_tokens"):
            if getattr(fa, key) < 1:
                raise ValueError(f"fairness.{key}={getattr(fa, key)} must be >= 1")
        if not fa.group_field or not fa.prompt_field:
            raise ValueError(f"fairness.group_field={fa.group_field!r} and fairness.prompt_field="
                             f"{fa.prompt_field!r} must name a field")
        if not (fa.attributes and fa.languages) and not fa.data:
            raise ValueError(f"fairness.attributes={fa.attributes} and fairness.languages={fa.languages} "
                             "leave nothing to audit: name at least one of each, or fairness.data")
        if not 0 <= t.zero_stage <= 3:
            raise ValueError(f"train.zero_stage={t.zero_stage} must be 0, 1, 2 or 3")
        if t.seq_len > m.max_seq_len:
            raise ValueError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
        d = self.data
        if d.bands * d.rows > d.num_perm:
            raise ValueError(f"data.bands x data.rows = {d.bands * d.rows} exceeds data.num_perm={d.num_perm}")
        if not 0 < d.min_units <= d.max_units:
            raise ValueError(f"data.min_units={d.min_units} must be in 1..data.max_units={d.max_units}")
        for key in ("num_shards", "shingle_size", "bands", "rows", "bucket_owners"):
            if getattr(d, key) < 1:
                raise ValueError(f"data.{key}={getattr(d, key)} must be >= 1")
        if self.tokenizer.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"tokenizer.vocab_size={self.tokenizer.vocab_size} is below {MIN_VOCAB_SIZE}: "
                             "byte fallback needs 256 byte pieces plus the special tokens")
        if self.tokenizer.vocab_size > m.vocab_size:
            raise ValueError(f"tokenizer.vocab_size={self.tokenizer.vocab_size} exceeds "
                             f"model.vocab_size={m.vocab_size}")
        for key in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "checkpoint_every",
                    "eval_every", "eval_batches", "num_workers"):
            if getattr(t, key) < 1:
                raise ValueError(f"train.{key}={getattr(t, key)} must be >= 1")
        if t.offload and t.zero_stage == 0:
            raise ValueError("train.offload=True needs train.zero_stage >= 1 (got 0): "
                             "ZeRO offloads the optimizer state it partitions")
        if t.seq_len_start:
            if not 8 <= t.seq_len_start <= t.seq_len:
                raise ValueError(f"train.seq_len_start={t.seq_len_start} must be in 8..train.seq_len={t.seq_len}")
            if t.curriculum_steps < 1:
                raise ValueError(f"train.curriculum_steps={t.curriculum_steps} must be >= 1 "
                                 "with train.seq_len_start set")
        sv = self.serve
        for key in ("replicas", "max_batch", "max_queue", "max_tokens", "max_n", "max_body_bytes"):
            if getattr(sv, key) < 1:
                raise ValueError(f"serve.{key}={getattr(sv, key)} must be >= 1")
        if sv.replica_cpus <= 0 or sv.request_timeout_s <= 0:
            raise ValueError(f"serve.replica_cpus={sv.replica_cpus} and serve.request_timeout_s="
                             f"{sv.request_timeout_s} must be > 0")
        if sv.response_cache < 0:
            raise ValueError(f"serve.response_cache={sv.response_cache} must be >= 0")
        if sv.torch_threads < 0:
            raise ValueError(f"serve.torch_threads={sv.torch_threads} must be >= 0")
        if sv.stream_interval_ms < 0:
            raise ValueError(f"serve.stream_interval_ms={sv.stream_interval_ms} must be >= 0")
        if sv.max_step_tokens and sv.max_step_tokens < sv.max_batch:
            raise ValueError(f"serve.max_step_tokens={sv.max_step_tokens} must be 0 or >= serve.max_batch={sv.max_batch}")
        if self.lora.rank < 1 or self.lora.alpha <= 0:
            raise ValueError(f"lora.rank={self.lora.rank} must be >= 1 and lora.alpha={self.lora.alpha} > 0")
        on = self.online
        for key in ("buffer_size", "min_feedback", "max_feedback", "steps", "batch_size", "num_workers",
                    "preference_pairs"):
            if getattr(on, key) < 1:
                raise ValueError(f"online.{key}={getattr(on, key)} must be >= 1")
        if not 0 <= on.feedback_fraction <= 1:
            raise ValueError(f"online.feedback_fraction={on.feedback_fraction} must be in [0, 1]")
        if on.half_life_s <= 0 or on.poll_s <= 0 or on.lr <= 0:
            raise ValueError(f"online.half_life_s={on.half_life_s}, online.poll_s={on.poll_s} and "
                             f"online.lr={on.lr} must be > 0")
        if on.min_feedback > on.max_feedback:
            raise ValueError(f"online.min_feedback={on.min_feedback} exceeds online.max_feedback={on.max_feedback}")
        if on.batch_size % on.num_workers:
            raise ValueError(f"online.batch_size={on.batch_size} is not divisible by online.num_workers={on.num_workers}")
        fb = self.feedback
        for key in ("collectors", "max_text_chars", "retention"):
            if getattr(fb, key) < 1:
                raise ValueError(f"feedback.{key}={getattr(fb, key)} must be >= 1")
        if fb.rating_min >= fb.rating_max:
            raise ValueError(f"feedback.rating_min={fb.rating_min} must be below feedback.rating_max={fb.rating_max}")
        tu = self.tune
        for key in ("num_samples", "max_steps", "reports"):
            if getattr(tu, key) < 1:
                raise ValueError(f"tune.{key}={getattr(tu, key)} must be >= 1")
        if tu.reports > tu.max_steps:
            raise ValueError(f"tune.reports={tu.reports} exceeds tune.max_steps={tu.max_steps}")
        if t.batch_size % t.grad_accum:
            raise ValueError(f"train.batch_size={t.batch_size} is not divisible by "
                             f"train.grad_accum={t.grad_accum}")
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        return _validate(data)


def _validate(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except pydantic.ValidationError as e:
        # Flatten pydantic's report into one line per key: "train.lr: <what is wrong> (got 'abc')".
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "config"
            got = f" (got {err['input']!r})" if err["type"] != "missing" and "input" in err else ""
            lines.append(f"{key}: {err['msg']}{got}")
        raise ValueError("invalid config: " + "; ".join(lines)) from None


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
            _set_dotted(overrides, key, yaml.safe_load(value) if value[:1] in "[{" else value)
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
    for name in Config.model_fields:
        section = getattr(cfg, name)
        lines.append(f"{name}:")
        for key, info in type(section).model_fields.items():
            lines.append(f"  --{name}.{key}={getattr(section, key)!r}  {info.description or ''}")
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


def stage_dir(cfg: Config, stage: str) -> str:
    """<run_dir>/<run.name>/<stage>: where a stage writes its outputs (a local path or a URI)."""
    return f"{cfg.run.run_dir.rstrip('/')}/{cfg.run.name}/{stage}"


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
