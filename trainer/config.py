"""The run configuration: one typed, validated section per concern.

A run is one YAML file plus optional dotted overrides (``adapter.rank=16``). It is validated once, here,
at the boundary; every error names the file and the field path (``configs/x.yaml: adapter.rank: must be
> 0``). Each field is documented where it is declared.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the file and the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class TinyModelSpec(Section):
    """A small random-init Llama built at ``model.path`` on first use (no download needed)."""

    hidden_size: int = Field(64, gt=0)
    """Width of the residual stream."""
    intermediate_size: int = Field(128, gt=0)
    """Width of the MLP."""
    num_layers: int = Field(2, gt=0)
    """Number of decoder layers."""
    num_heads: int = Field(4, gt=0)
    """Attention heads (hidden_size must divide evenly)."""
    num_kv_heads: int = Field(2, gt=0)
    """Key/value heads (grouped-query attention)."""
    vocab_size: int = Field(1024, ge=260)
    """Byte-level BPE vocabulary size of the tokenizer trained on ``tokenizer_corpus``."""
    tokenizer_corpus: list[str] = Field(min_length=1)
    """Local text/jsonl files the tokenizer is trained on."""
    seed: int = 0
    """Seed of the random initialisation."""
    pretrain_steps: int = Field(0, ge=0)
    """Full-parameter training steps on ``tokenizer_corpus`` before saving, so the base is not pure noise."""

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelSpec:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must divide hidden_size and num_kv_heads must divide num_heads")
        return self


class ModelConfig(Section):
    path: str
    """Local directory of the base model (a transformers checkpoint). Never downloaded."""
    quantization: Literal["nf4", "none"] = "none"
    """nf4: the frozen base is loaded in 4-bit NF4 through bitsandbytes (double quant, storage in the
    compute dtype so ZeRO-3 can shard it)."""
    build: TinyModelSpec | None = None
    """If set and ``path`` holds no model yet, build this tiny random-init model there first; a model
    already there must have been built from this spec and corpus (else an error: delete it to rebuild)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers. flash_attention_2 needs train.dtype: bf16, a GPU and the
    flash-attn package (the ``flash-attn`` extra; in docker/Dockerfile.cuda)."""


# What model.attn_implementation: flash_attention_2 needs (checked here for the dtype, where the model is
# loaded for the package): the one message for both, so whoever meets one learns the other.
FLASH_ATTENTION_NEEDS = (
    "model.attn_implementation: flash_attention_2 needs train.dtype: bf16 (FlashAttention-2 has no fp32 "
    "kernels) and the flash-attn package on every GPU worker (pip install 'riemann-tune[flash-attn]', "
    "or docker/Dockerfile.cuda); otherwise use sdpa"
)


AdapterMethod = Literal["lora", "dora", "bone", "bat", "flora", "sara", "mosara"]

# Methods whose adapters hold low-rank (A, B) factor pairs, the only ones the Riemannian preconditioner
# can act on (kept in step with each method's ``factor_pairs``; tests/test_adapters.py checks it).
PAIRED_METHODS: frozenset[str] = frozenset({"lora", "dora", "sara"})


class SaraConfig(Section):
    """SARA's per-module rank rule (also picks Mo-SARA's number of singular directions k).

    k = the smallest k whose leading singular values sum to ``tau`` of the total, clipped to
    [r_min, r_max] (our reading of arXiv 2408.03290: see docs/methods.md).
    """

    tau: float = Field(0.5, gt=0, le=1)
    """Fraction of the sum of the base weight's singular values the chosen rank must reach."""
    r_min: int = Field(1, gt=0)
    """Smallest rank a module may get."""
    r_max: int = Field(64, gt=0)
    """Largest rank a module may get."""

    @model_validator(mode="after")
    def _ordered(self) -> SaraConfig:
        if self.r_min > self.r_max:
            raise PydanticCustomError("config", "r_min must be <= r_max")
        return self


class MoSaraConfig(Section):
    """Mo-SARA: E experts of singular-value vectors mixed by a router (the k directions: ``adapter.sara``)."""

    num_experts: int = Field(4, gt=0)
    """Number E of trainable vectors lambda_e (length k each)."""
    router_input: Literal["input", "subspace"] = "input"
    """The router's size. input: g(x) = softmax(W_g x) with W_g (E x in); subspace: W_g = W_s V_k^T with only
    W_s (E x k) trainable, so the router reads the k coordinates the update uses anyway (E*k parameters)."""


class FloraConfig(Section):
    """FLoRA's Tucker ranks beyond the out/in modes (which use ``adapter.rank``)."""

    spatial_rank: int | None = Field(None, gt=0)
    """Rank of each kernel mode of a convolution (clipped to the kernel size); null: the full kernel size."""


class AdapterConfig(Section):
    method: AdapterMethod = "lora"
    """Adapter method (docs/methods.md): lora, dora, bone, bat, flora, sara or mosara."""
    rank: int = Field(8, gt=0)
    """Rank r of the low-rank factors (bone/bat: the block size; flora: the out and in mode ranks;
    sara/mosara: ignored, each module's rank comes from ``adapter.sara``)."""
    alpha: float = Field(16.0, gt=0)
    """Scale numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rslora). Unused by bone, bat
    and mosara, which have no scale."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input (bat has no input path: must be 0)."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module-name suffixes or regexes (``re:...``) to adapt, or all-linear (every Linear but lm_head)."""
    sara: SaraConfig = SaraConfig()
    """The SVD rank rule of sara and mosara."""
    mosara: MoSaraConfig = MoSaraConfig()
    """Experts and router of mosara."""
    flora: FloraConfig = FloraConfig()
    """Kernel-mode ranks of flora on convolutions."""

    @field_validator("dropout")
    @classmethod
    def _bat_has_no_dropout(cls, dropout: float, info: ValidationInfo) -> float:
        if dropout and info.data.get("method") == "bat":
            raise PydanticCustomError(
                "config", "bat updates the weight itself, it has no input path to drop: use 0"
            )
        return dropout

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class OptimConfig(Section):
    name: Literal["adamw", "sgd"] = "adamw"
    """Base optimizer; with the preconditioner on these are scaled AdamW / scaled GD."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's moment decay rates."""
    eps: float = Field(1e-8, gt=0)
    """Adam's denominator epsilon."""
    momentum: float = Field(0.0, ge=0, lt=1)
    """SGD momentum."""
    preconditioner: Literal["riemannian", "none"] = "riemannian"
    """riemannian: precondition each (A, B) pair's gradient by its r x r Gram matrices (arXiv 2402.02347)."""
    delta: float = Field(1e-2, ge=0)
    """Regulariser of the r x r systems (see ``damping``); PEFT's default is 1e-2 absolute."""
    damping: Literal["absolute", "relative"] = "absolute"
    """absolute: solve (G + delta I); relative: (G + (delta * trace(G) / r + delta_min) I), which scales
    with the factor, so the same delta suits any model width and init scale."""
    delta_min: float = Field(1e-8, ge=0)
    """Floor of the relative damping (B = 0 at init has trace 0)."""
    solve_dtype: Literal["float32", "float64"] = "float32"
    """Precision of the r x r solves, whatever the training dtype."""
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warm-up."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm (of the preconditioned gradient) to this; null disables."""


class DataSource(Section):
    """One training source: a file, a glob or a ``datasets.save_to_disk`` directory, with its weight."""

    path: str
    """Local .jsonl, .json, .csv, .parquet or .arrow file, a glob of them, or a save_to_disk directory."""
    weight: float = Field(1.0, gt=0)
    """Relative share of this source in the mixture (probability weight/sum of weights per drawn row)."""
    split: str = "train"
    """Split to read when ``path`` is a saved DatasetDict."""


class DataConfig(Section):
    train_path: list[DataSource]
    """Training data: a path or glob (see DataSource.path), or a list of sources (paths or mappings)
    mixed by weight."""
    eval_path: str | None = None
    """Evaluation data (a path or glob); null: none, unless ``eval_fraction`` holds some out."""
    format: Literal["instruction", "text", "chat"] = "instruction"
    """instruction: prompt/response fields in ``prompt_template``; text: one text field; chat: a list of
    {role, content} messages rendered with the chat template."""
    prompt_field: str = "instruction"
    """Field holding the prompt (instruction format)."""
    response_field: str = "response"
    """Field holding the response (instruction format)."""
    text_field: str = "text"
    """Field holding the text (text format)."""
    prompt_template: str = "### Instruction:\n{prompt}\n\n### Response:\n"
    """Template around the prompt; the response follows it directly, then the EOS token."""
    train_on_prompt: bool = False
    """False: only response (instruction) or assistant (chat) tokens carry loss; True: every token does."""
    max_seq_len: int = Field(256, gt=1)
    """Longest example in tokens (see ``truncate``); with ``packing`` the length of every packed row."""
    input_field: str = "input"
    """Optional field with the task's input (Alpaca); when non-empty ``input_template`` is used."""
    input_template: str = "### Instruction:\n{prompt}\n\n### Input:\n{input}\n\n### Response:\n"
    """Template around prompt and input for rows that have an input (instruction format)."""
    messages_field: str = "messages"
    """Field holding the list of {role, content} messages (chat format)."""
    chat_template: str | None = None
    """Jinja chat template; null: the tokenizer's, else trainer.data.formats.DEFAULT_CHAT_TEMPLATE."""
    truncate: bool = True
    """True: examples longer than ``max_seq_len`` are cut to it; False: they are bad rows."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A row with a missing or mistyped field, no messages, no loss-carrying token, or too long (without
    ``truncate``): error stops with its file and row; skip drops it and counts it (summary, metrics)."""
    packing: bool = False
    """Pack several examples into each row of ``max_seq_len`` tokens (best-fit decreasing); position ids
    restart per example and attention stays inside it."""
    shuffle_buffer: int | None = Field(None, gt=0)
    """Examples shuffled (and packed) together, in consecutive windows of the mixed data; null: the whole
    data set at once (map-style only). Streaming and map-style runs with the same value see the same
    batches."""
    streaming: bool = False
    """Read the training files as a stream (never all in memory, no tokenisation cache)."""
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    """Hold out this fraction of every training source for evaluation (instead of ``eval_path``)."""
    eval_seed: int = 0
    """Seed of the held-out split (apart from train.seed, so the split stays fixed across runs)."""
    cache_dir: str | None = None
    """Tokenisation cache; null: <datasets cache>/riemann_tune_tokenized. Keyed by tokenizer, encoding
    settings and file fingerprints (path, size, mtime)."""
    num_proc: int | None = Field(None, gt=0)
    """Processes tokenising a file; null: one per CPU (up to 8) for files of 20k rows or more, else 1."""

    @field_validator("train_path", mode="before")
    @classmethod
    def _sources(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) else value
        return [{"path": s} if isinstance(s, str) else s for s in items] if isinstance(items, list) else value

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.eval_path and self.eval_fraction:
            raise ValueError("eval_path and eval_fraction are exclusive: choose one evaluation source")
        if self.streaming and self.shuffle_buffer is None:
            raise ValueError("streaming needs shuffle_buffer (a number of examples): it cannot shuffle all")
        if self.streaming and self.eval_fraction:
            raise ValueError(
                "streaming cannot hold out eval_fraction (it would read the whole corpus): use eval_path"
            )
        return self


class DistributedConfig(Section):
    backend: Literal["ray", "local"] = "local"
    """ray: a Ray Train TorchTrainer; local: this process (and torchrun-spawned peers)."""
    num_workers: int = Field(1, gt=0)
    """Data-parallel workers (processes)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage."""
    offload_optimizer: bool = False
    """Keep optimizer state on the CPU (ZeRO-Offload)."""
    shard_vocab: bool = True
    """ZeRO-3 with several workers: split the frozen embedding and output head by vocabulary rows
    over the ranks and compute with the rows each holds, instead of gathering the whole matrices at
    every use (trainer/model/vocab.py). Applies where the vocabulary divides by the workers."""
    use_gpu: bool | None = None
    """Train on GPUs; null: when CUDA is available."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs Ray reserves for each worker."""
    ray_address: str | None = None
    """Existing Ray cluster to join (auto or HOST:PORT); null: start a local one."""
    max_failures: int = Field(0, ge=0)
    """Ray: restart the workers from the last checkpoint up to this many times after a failure."""
    gpus_per_worker: float = Field(1.0, gt=0)
    """GPUs Ray reserves for each worker when it trains on GPUs: a whole number (each rank needs a GPU
    of its own under NCCL; a worker given several uses the first)."""
    collective_timeout_s: float = Field(1800.0, gt=0)
    """How long a collective (a barrier included) may wait for the slowest rank before the run fails.
    Ranks wait for rank 0 while it tokenises the data, converts a checkpoint or uploads the outputs;
    NCCL's and DeepSpeed's default of 10 minutes would kill such a run."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers' resource bundles on nodes: PACK fills few nodes, SPREAD spreads over
    many (best effort), STRICT_* insist (and wait for a placement that fits)."""
    ray_dashboard: bool = False
    """Start the Ray dashboard (and with it the Jobs API) with the local cluster this run starts."""
    ray_dashboard_host: str = "127.0.0.1"
    """Interface the local cluster's dashboard and Jobs API bind to. Anything but loopback lets whoever
    reaches the port run code on the cluster (CVE-2023-48022): only behind a firewall you control."""

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_gpus(cls, gpus: float, info: ValidationInfo) -> float:
        if info.data.get("use_gpu") is not False and gpus != int(gpus):
            raise PydanticCustomError(
                "config",
                "{gpus} is not a whole number: two ranks sharing one GPU cannot train under NCCL, which "
                "refuses two ranks on the same device; use 1 (or more) GPUs per worker, or "
                "distributed.use_gpu=false",
                {"gpus": gpus},
            )
        return gpus


class TrainConfig(Section):
    max_steps: int = Field(100, gt=0)
    """Optimizer steps."""
    micro_batch_size: int = Field(8, gt=0)
    """Examples per worker per forward pass."""
    grad_accum_steps: int = Field(1, gt=0)
    """Micro-batches per optimizer step on each worker."""
    seed: int = 0
    """Seed of adapter init, data order and dropout."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Training (and compute) dtype."""
    eval_every_n_steps: int = Field(0, ge=0)
    """Evaluate every N steps (0: only at the start and the end)."""
    eval_max_batches: int | None = Field(None, gt=0)
    """Cap on eval micro-batches per worker; null: the whole eval set."""
    log_every_n_steps: int = Field(1, gt=0)
    """Log metrics every N steps."""
    max_bad_steps: int = Field(3, gt=0)
    """Stop with an error after this many optimizer steps in a row with a non-finite loss or gradient
    (each is skipped: no update); the last good checkpoint is kept."""
    inject_nonfinite_steps: list[int] = []
    """Fault injection for tests and drills: make the loss infinite at these steps (1-based)."""
    sample_prompts: int = Field(4, ge=0)
    """At every evaluation, answer the first N prompts of ``data.eval_path`` greedily and log them
    (samples.jsonl, an MLflow table) with their exact match (``eval/exact_match``); 0: off. Needs
    instruction or chat data."""
    sample_max_new_tokens: int = Field(64, gt=0)
    """Most tokens of each sample answer."""
    loss_chunk_tokens: int | None = Field(None, ge=0)
    """Compute the cross-entropy over this many tokens at a time, so the micro-batch's float32 logits
    never exist whole (trainer/loss.py); 0: unchunked; null: 1024 for vocabularies of 32,000 and more,
    where the logits dwarf everything else a step holds, else unchunked."""
    compile: bool = False
    """torch.compile each decoder layer on its own (regional, as torchtune does: trainer/model/speed.py),
    with any adapter method, on full-precision and NF4 bases (no graph break at bitsandbytes' 4-bit
    matmul: it is registered as torch ops). Off by default: it costs 17-35 s of compilation at the first
    steps on the 2-core CPU (~70 s with a cold inductor cache), and no speed-up was resolved there
    (bench.peers --compile, README's Performance)."""
    liger: bool = False
    """Liger kernels (RMSNorm, SwiGLU, RoPE; the liger-kernel package, installed apart) patched into the
    model. Triton kernels for CUDA GPUs only: refused with distributed.use_gpu false, and at load time on
    any worker without CUDA or without the package."""
    force: bool = False
    """Train even if the memory plan (``python -m launch plan``), run first on the GPUs found, says the
    run does not fit them."""


class CheckpointConfig(Section):
    every_n_steps: int = Field(0, ge=0)
    """Save a checkpoint every N steps (0: never)."""
    keep_last: int = Field(2, gt=0)
    """How many checkpoints to keep."""
    verify_hashes: bool = True
    """Record a sha256 of every checkpoint file and check it on resume (sizes are always checked)."""


class TrackingConfig(Section):
    enabled: bool = True
    """Log to MLflow (rank 0 only)."""
    uri: str | None = None
    """MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite:///<output.dir>/../mlflow.db. Never
    credentials (user:password@): they come only from MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN."""
    experiment: str | None = None
    """MLflow experiment name; null: $MLFLOW_EXPERIMENT_NAME, else ``default``."""
    run_name: str | None = None
    """MLflow run name; null: the output directory's name."""
    run_id: str | None = None
    """An existing MLflow run to continue (a restarted job); null: a new run."""
    parent_run_id: str | None = None
    """Create the run as a nested child of this MLflow run (a sweep's trials, under the sweep's run)."""
    log_adapter: bool = True
    """Upload the adapter weights as an artefact (its small JSON files, e.g. a rank map, always go)."""
    registered_model: str | None = None
    """Register the final adapter as a new version of this MLflow registered model; null: don't."""
    system_metrics: bool = True
    """MLflow system metrics of rank 0's node (CPU, memory, disk, network; NVIDIA GPUs with nvidia-ml-py)."""
    system_metrics_interval_s: float = Field(10.0, gt=0)
    """Seconds between two system-metrics samples."""
    queue_size: int = Field(10_000, gt=0)
    """Metric rows (steps) held for the server during an outage; beyond it the oldest are dropped and
    counted (metrics.jsonl keeps every row)."""
    retry_max_s: float = Field(30.0, gt=0)
    """Longest wait between two attempts to reach the server (the backoff doubles from 0.5 s)."""
    request_timeout_s: int = Field(30, gt=0)
    """Timeout of one request to an HTTP tracking server (MLflow's own retries are off: we retry)."""
    drain_timeout_s: float = Field(60.0, ge=0)
    """At the end, how long to wait for queued metrics (then again for artefacts) to reach the server."""

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        if uri and urlsplit(uri).username is not None:
            raise ValueError(
                "must not contain credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                "(or MLFLOW_TRACKING_TOKEN) in the environment"
            )
        return uri

    @model_validator(mode="after")
    def _registration_needs_weights(self) -> TrackingConfig:
        if self.registered_model and not self.log_adapter:
            raise ValueError("registered_model needs log_adapter: true (the version points at the weights)")
        return self


class OutputConfig(Section):
    dir: str
    """Where the run writes adapter/, config.yaml, summary.json (and checkpoints/)."""


class RunConfig(Section):
    model: ModelConfig
    adapter: AdapterConfig = AdapterConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig
    distributed: DistributedConfig = DistributedConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    output: OutputConfig
    resume: str | None = None
    """auto: continue from the newest usable checkpoint under <output.dir>/checkpoints (or start fresh);
    a path: continue from that checkpoint directory; null: start fresh."""

    @property
    def checkpoint_root(self) -> Path:
        """Where checkpoints go and where resume=auto looks."""
        return Path(self.output.dir) / "checkpoints"

    @model_validator(mode="after")
    def _preconditioner_needs_pairs(self) -> RunConfig:
        if self.optim.preconditioner == "riemannian" and self.adapter.method not in PAIRED_METHODS:
            raise PydanticCustomError(
                "config",
                "optim.preconditioner: riemannian acts on low-rank (A, B) factor pairs and "
                "adapter.method={method} has none (only {paired} do): set optim.preconditioner: none",
                {"method": self.adapter.method, "paired": ", ".join(sorted(PAIRED_METHODS))},
            )
        return self

    @model_validator(mode="after")
    def _liger_needs_a_gpu(self) -> RunConfig:
        if self.train.liger and self.distributed.use_gpu is False:
            raise PydanticCustomError(
                "config",
                "train.liger: Liger kernels are Triton kernels for CUDA GPUs and distributed.use_gpu is "
                "false: set train.liger: false",
            )
        return self

    @model_validator(mode="after")
    def _flash_attention_needs_bf16(self) -> RunConfig:
        if self.model.attn_implementation == "flash_attention_2" and self.train.dtype != "bf16":
            raise PydanticCustomError("config", FLASH_ATTENTION_NEEDS + " (train.dtype is {dtype})",
                                      {"dtype": self.train.dtype})  # fmt: skip
        return self

    @property
    def global_batch_size(self) -> int:
        """Examples per optimizer step, over all workers and accumulation steps."""
        t = self.train
        return t.micro_batch_size * t.grad_accum_steps * self.distributed.num_workers


_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "missing": "is required",
    "extra_forbidden": "unknown field",
}


def _format_error(err: Any) -> str:
    path = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
    template = _MESSAGES.get(err["type"])
    msg = template.format(**err.get("ctx", {})) if template else err["msg"]
    return f"{path}: {msg}" if path else msg


def validate(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Validate a raw mapping into a RunConfig; errors name ``source`` and each field path."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = [f"{source}: {_format_error(err)}" for err in e.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested mapping, returning a copy."""
    out = _deep_copy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[leaf] = yaml.safe_load(value)
    return out


def _deep_copy(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}


def load(path: str | Path, overrides: list[str] = ()) -> RunConfig:  # type: ignore[assignment]
    """Load a YAML config file, apply dotted overrides and validate it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    source = f"{path}" + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    return validate(apply_overrides(raw, list(overrides)), source)


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (what a run saves as config.yaml)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(cfg: RunConfig) -> dict[str, str]:
    """The resolved config as flat ``section.field`` -> string pairs (MLflow params)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = str(node)

    walk("", cfg.model_dump(mode="json"))
    return flat
