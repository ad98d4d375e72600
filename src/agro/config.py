"""Typed configs, one per entry point, loaded from YAML with ``key=value`` overrides.

Every field carries its help text (``agro train --help`` prints them all). Values from YAML and
from the command line are coerced to the field's type and validated *before* any model loads;
an unknown key or an invalid value raises :class:`ConfigError` naming the key, the source (file
and line, or the command-line argument) and the valid choices.

Shared groups of fields (model, task, sampling) live in small base dataclasses so the three
entry points (train, generate, eval) cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """An invalid configuration: names the key, where it came from and what is allowed."""


def _f(default: Any, help: str, choices: tuple | None = None, **kw) -> Any:
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


# --------------------------------------------------------------------------- field groups
@dataclass
class ModelFields:
    model: str = _f("default", "Policy: a Hugging Face hub id, a local directory saved with "
                    "save_pretrained, a .gguf file, or 'default' (the embedded SmolLM2-135M-Instruct).")
    precision: str = _f("auto", "Matmul precision: 'bf16' (full fine-tuning: a bf16 working copy of "
                        "the weights over fp32 masters and optimizer state, a bf16 reference; "
                        "LoRA: autocast), 'fp32', or 'auto': fp32 on a CPU without native bf16 "
                        "matmuls (emulated, several times slower); bf16 on a GPU; on a CPU with "
                        "native bf16, `agro train` times this model in both and keeps the faster "
                        "(cached per machine; `agro generate`/`eval` follow that choice); fp32 "
                        "when fresh samples from pi would get the loss's on-policy-only terms "
                        "and sampler_on_policy=auto (bf16 sampling is not close enough to pi for "
                        "them). A resumed run keeps its choice. Log-softmax is always fp32.",
                        ("auto", "bf16", "fp32"))
    linear_backend: str = _f("auto", "fp32 linear layers on a CPU: 'aten' (PyTorch's own GEMM: "
                             "MKL on x86), 'onednn' (oneDNN's GEMM, which uses AVX-512 on AMD CPUs "
                             "where MKL does not, for the forward, input and weight gradients), "
                             "'onednn_fwd' (the weight gradient on aten), or 'auto': time them on "
                             "this model's layer shapes (cached per machine) and keep the fastest, "
                             "oneDNN only if >= 5 % faster; aten when precision=bf16 is set, off "
                             "the CPU, or with a reduced fp32 matmul precision. A resumed run keeps "
                             "its choice unless another is set. (precision=auto may then pick bf16, "
                             "whose products fall back to PyTorch's own.)",
                             ("auto", "aten", "onednn", "onednn_fwd"))
    num_threads: int = _f(0, "torch intra-op threads (0 = all cores).")
    seed: int = _f(0, "Random seed (python, numpy, torch, task generator).")


@dataclass
class TaskFields:
    task: str = _f("arithmetic", "Task: 'arithmetic' (built-in, seeded), 'math' (MATH-format rows: "
                   "problem/solution/answer), 'gsm8k' (question/answer with '#### N').",
                   ("arithmetic", "math", "gsm8k"))
    data_path: str = _f("", "For math/gsm8k: a local .jsonl/.json/.parquet file or a `datasets` "
                        "name (train prompts).")
    eval_data_path: str = _f("", "For math/gsm8k: held-out file or `datasets` name. Empty: ~10 % of "
                             "data_path (at most 500 rows, chosen by a stable hash) is held out "
                             "and kept out of training.")
    data_split: str = _f("train", "`datasets` split for data_path when it is a hub name.")
    arithmetic_level: int = _f(1, "Arithmetic difficulty: 1 = one-digit + and *, 2 = two-digit, "
                               "3 = three-digit with -, ...")
    arithmetic_range: str = _f("", "Arithmetic over a custom space instead of a level: two operands "
                               "'LO-HI' or 'LO-HI:OPS', e.g. '0-20:+-*' (operators from + - *; "
                               "default all three). ~20 % held out by a stable hash.")
    prompt_template: str = _f("auto", "Prompt: 'auto' (bare for arithmetic, paper for math/gsm8k), "
                              "'bare', 'paper' (step by step, ends 'The final answer is ...'), "
                              "'boxed', 'number' (the question + 'Answer with only the number.').",
                              ("auto", "bare", "paper", "boxed", "number"))
    max_prompt_tokens: int = _f(512, "Prompts longer than this (in tokens) are skipped and counted.")
    skip_bad_rows: bool = _f(False, "Skip and count malformed data rows instead of stopping with "
                             "an error naming file, line and field.")
    reward_timeout: float = _f(1.0, "Wall-clock bound in seconds for grading one completion.")


@dataclass
class SamplingFields:
    group_size: int = _f(4, "n: completions per prompt (>= 2 for every group loss).")
    max_new_tokens: int = _f(32, "Maximum completion length in tokens.")
    temperature: float = _f(1.0, "Sampling temperature. != 1 makes samples off-policy (on-policy "
                            "terms switch off and this is logged).")
    top_p: float = _f(1.0, "Nucleus sampling. < 1 makes samples off-policy.")
    top_k: int = _f(0, "Top-k sampling (0 = off). > 0 makes samples off-policy.")
    generation_batch_size: int = _f(64, "Max sequences per generate() call of training's sampler "
                                    "and `agro generate` (evaluations: eval_batch_size, whose "
                                    "auto cap is never below this).")
    generator: str = _f("cached", "Sampler: 'cached' (agro's KV-cache loop: one prefill per prompt, "
                        "finished samples leave the batch), 'hf' (transformers generate()) or "
                        "'vllm' (an in-process vLLM engine; optional, `make vllm-setup` on CPU). "
                        "All sample from the same distribution up to their numerics "
                        "(sampler_on_policy).", ("cached", "hf", "vllm"))
    vllm_sync_every: int = _f(1, "generator=vllm: push the policy's weights into the engine every "
                              "k optimizer steps (and at every checkpoint and evaluation); its "
                              "groups are dated by the version it holds, 0..k-1 versions old "
                              "(stale ones: on-policy-only terms off, no importance weights).")
    sampler_on_policy: str = _f("auto", "Do the sampler's samples count as draws from pi for the "
                                "on-policy-only loss terms (agro_on's LR term, the local "
                                "estimators)? 'auto': yes when the measured mean per-completion "
                                "|log pi_sampler(y) - log pi_learner(y)| is <= "
                                "sampler_mismatch_tol. Measured once at the start (generator=vllm "
                                "always; others when the loss has on-policy-only terms); kept on "
                                "--resume. Was vllm_on_policy.", ("auto", "yes", "no"))
    sampler_mismatch_tol: float = _f(1e-2, "sampler_on_policy=auto: the mean per-completion "
                                     "log-prob mismatch (nats) up to which samples count as "
                                     "on-policy (measured: agro's sampler 2e-5 in fp32, 0.35 in "
                                     "bf16; vLLM 4e-4 / 0.37; docs/RESULTS.md). Was "
                                     "vllm_mismatch_tol.")
    vllm_kv_cache_gib: int = _f(2, "generator=vllm on CPU: KV-cache memory (GiB) of the engine.")
    vllm_gpu_memory_utilization: float = _f(0.3, "generator=vllm on a GPU: the fraction of its "
                                            "memory the engine may take (the learner shares the "
                                            "device). Never run by the project (no GPU here).")


@dataclass
class EvalBatchFields:
    eval_batch_size: int = _f(0, "Max sequences per generate() call in held-out evaluations (0 = "
                              "auto: as many as ~1 GiB of the sampler's estimated KV cache and "
                              "logits holds, a cap never below generation_batch_size; all with "
                              "vLLM; calls of equal size). Fewer, larger calls are faster: each "
                              "decodes to its longest completion.")


# --------------------------------------------------------------------------- entry points
MICRO_BATCH_TOKENS = {"bf16": 4096, "fp32": 512}
"""``micro_batch_tokens=-1`` (the default) by precision. Measured on the default job
(SmolLM2-135M, 8 groups of 4, 2 cores, AMD EPYC Zen 4; docs/RESULTS.md): in bf16 one
micro-batch for the whole step (4096) was the faster. In fp32, whose activations take twice the
bytes, 768 (two micro-batches while completions are long) took 4-19 % less learner time than
4096 and peaked 0.55 GiB lower (2026-12-03). 512 (three groups at a time) then peaked another
0.19 GiB lower, at 3.81-3.83 GiB against 4.01, with learner times 0.93-1.00x of 768's
(2026-12-04, two rounds each)."""


def micro_batch_tokens_for(cfg, precision: str | None = None) -> int:
    """The token budget per micro-batch a config means in ``precision`` (default: its own, which
    must be concrete): its ``micro_batch_tokens``, or MICRO_BATCH_TOKENS[precision] for -1."""
    v = cfg.micro_batch_tokens
    return v if v >= 0 else MICRO_BATCH_TOKENS[precision or cfg.precision]


@dataclass
class TrainConfig(EvalBatchFields, ModelFields, TaskFields, SamplingFields):
    """`agro train`: RL fine-tuning with AGRO (or a baseline loss)."""

    loss: str = _f("agro", "Registered loss: agro (off-policy AGRO, Eq. 4), agro_on (on-policy "
                   "AGRO, Eq. 6), kl_pg, kl_pg_token, grpo.")
    beta: float = _f(0.02, "KL coefficient beta >= 0 (agro_on needs > 0).")
    loss_options: dict = _f({}, "Loss-specific options, e.g. loss_options.lr_coef=0.5, "
                            "loss_options.reg_estimator=causal, loss_options.logprob_reduction=mean.")
    steps: int = _f(60, "Optimizer steps.")
    prompts_per_step: int = _f(8, "Prompt groups per optimizer step.")
    micro_batch_groups: int = _f(8, "At most this many groups per micro-batch (gradient "
                                 "accumulation over the step's micro-batches).")
    micro_batch_tokens: int = _f(-1, "At most this many positions per micro-batch: groups x "
                                 "the widest group's prompt + completions (a group wider than "
                                 "this is a micro-batch alone; 0: no limit; -1: by precision once "
                                 "it is known, 4096 in bf16 and 512 in fp32, see "
                                 "MICRO_BATCH_TOKENS). Lower it if the learner runs out of "
                                 "memory; reference passes split by the same rule.")
    lr: float = _f(2e-5, "AdamW learning rate.")
    lr_schedule: str = _f("constant", "After warm-up: 'constant' or 'cosine'.", ("constant", "cosine"))
    warmup_steps: int = _f(2, "Linear warm-up steps.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.99, "AdamW beta2.")
    max_grad_norm: float = _f(1.0, "Gradient-norm clipping (0 = off).")
    grad_accum: str = _f("auto", "bf16 full fine-tuning: where micro-batch gradients add up. 'fp32': "
                         "each micro-batch's bf16 gradients go into the fp32 masters (exact; one "
                         "more pass over the weights per micro-batch); 'bf16': they add up in the "
                         "bf16 working copy and go into the masters once per step (measured on the "
                         "default step, Zen 4: learner 5.4 s vs 6.4 s); 'auto': fp32 on a GPU, "
                         "bf16 on a CPU. No effect in fp32 or LoRA runs.", ("auto", "bf16", "fp32"))
    lora: bool = _f(False, "Train LoRA adapters (peft); the reference is the same model with "
                    "adapters disabled.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_dropout: float = _f(0.0, "LoRA dropout: must stay 0. agro scores every log-prob in eval "
                             "mode (dropout would make the learner's log-probs differ from the "
                             "sampler's and the reference's), so dropout would have no effect.")
    lora_target_modules: str = _f("all-linear", "LoRA target modules (comma-separated or 'all-linear').")
    source: str = _f("fresh", "Data source per group: fresh, replay, offline, stale, or a weighted "
                     "mix like 'fresh:0.5,offline:0.5'.")
    replay_prob: float = _f(0.5, "replay: probability that a fresh group is replaced by a stored one.")
    replay_capacity: int = _f(64, "replay: buffer capacity in groups.")
    offline_path: str = _f("", "offline: file(s) written by `agro generate` (.jsonl or .parquet; "
                           "comma-separated).")
    stale_lag: int = _f(2, "stale: generation lags the learner by this many policy versions.")
    async_generation: bool = _f(False, "Generate in Ray actor processes, ahead of the learner by "
                                "max_staleness policy versions (source=fresh only; `pip install "
                                "'agro[async]'`). Stale groups train with no importance weights.")
    max_staleness: int = _f(1, "async_generation: the groups learned at version v were sampled at "
                            "version >= v - max_staleness (0 = generate and learn in turn).")
    async_actors: int = _f(1, "async_generation: rollout actors; each step's prompts are split "
                           "between them.")
    async_actor_cpus: int = _f(1, "async_generation: CPU cores (Ray num_cpus and torch threads) "
                               "per actor. On a local instance the learner keeps the remaining "
                               "cores (when num_threads=0).")
    async_actor_gpus: float = _f(0.0, "async_generation: GPUs per actor (Ray num_gpus). Never run "
                                 "by the project (no GPU here).")
    async_timeout: float = _f(900.0, "async_generation: seconds to wait for an actor's groups "
                              "before the run stops with an error (never a hang).")
    async_max_restarts: int = _f(2, "async_generation: times Ray restarts a dead actor (its "
                                 "lost requests are sent again); then the run stops with an error.")
    ray_address: str = _f("", "async_generation: '' starts a local Ray instance; 'auto' or "
                          "'HOST:PORT' joins a running cluster.")
    offline_check_rows: int = _f(4, "offline: rows per file whose reference log-probs are recomputed "
                                 "at load and compared with the stored ones (0 = only the recorded "
                                 "reference identity is checked).")
    trust_offline_reference: bool = _f(False, "offline: go on (with a warning) when a file's "
                                       "reference model, tokenizer or precision differ from this "
                                       "run's or its stored reference log-probs disagree with a "
                                       "recomputation. Only for a user who knows the file is right.")
    output_dir: str = _f("runs/agro", "Run directory: metrics.jsonl, TensorBoard events, "
                         "checkpoints/, final/, plots.")
    save_every: int = _f(10, "Checkpoint every k steps (0 = only at the end).")
    keep_checkpoints: int = _f(2, "How many complete checkpoints to keep.")
    save_async: bool = _f(True, "Write checkpoints on a background thread while the next step "
                          "samples and scores (its optimizer step waits for the write; "
                          "single-process runs only). A crash before the write finished resumes "
                          "from the checkpoint before it. false: every save blocks until written.")
    eval_prompts: int = _f(45, "Held-out prompts for the before/after evaluation (0 = skip; the "
                           "level-1 arithmetic held-out pool has 45).")
    eval_samples: int = _f(4, "Sampled completions per held-out prompt (temperature 1).")
    eval_every: int = _f(0, "Evaluate every k steps as well (0 = only before and after).")
    eval_before: bool = _f(True, "Evaluate the base model before the first step (`agro repro` "
                           "evaluates it once per seed instead of once per run).")
    save_final: bool = _f(True, "Write output_dir/final (the model in transformers format) at the end.")
    overwrite: bool = _f(False, "A new run (not --resume) in an output_dir that holds an earlier "
                         "run: replace that run's files. Without it the run stops and says so "
                         "(its metrics would be mixed with the earlier run's).")
    max_consecutive_skips: int = _f(3, "Stop after this many consecutive non-finite steps.")
    tensorboard: bool = _f(True, "Write TensorBoard events to output_dir/tb.")
    wandb: bool = _f(False, "Log to Weights & Biases (if installed).")
    wandb_project: str = _f("agro", "W&B project.")
    progress: bool = _f(True, "Show a rich progress bar.")
    plot: bool = _f(True, "Write output_dir/curves.png at the end.")


@dataclass
class GenerateConfig(ModelFields, TaskFields, SamplingFields):
    """`agro generate`: sample groups and write an offline dataset (rewards + reference log-probs)."""

    output: str = _f("offline.jsonl", "Output file (.jsonl or .parquet).")
    num_prompts: int = _f(64, "How many prompts to sample groups for.")
    ref_model: str = _f("", "Reference model for the stored log-probs (default: the same as model).")


@dataclass
class EvalConfig(EvalBatchFields, ModelFields, TaskFields, SamplingFields):
    """`agro eval`: held-out accuracy, greedy and sampled."""

    num_prompts: int = _f(100, "Held-out prompts.")
    samples: int = _f(4, "Sampled completions per prompt (temperature from `temperature`).")
    greedy: bool = _f(True, "Also report greedy accuracy.")


@dataclass
class PlotConfig:
    """`agro plot`: held-out accuracy, reward, completion length, KL and loss curves of runs."""

    runs: list[str] = _f([], "Run directories, each with a metrics.jsonl (and events.jsonl for the "
                         "before/after evaluations). Usually positionals: agro plot RUN_DIR...; "
                         "in YAML a list, as key=value comma-separated.")
    out: str = _f("", "Output image, format from the suffix (.png, .pdf, .svg). Empty: "
                  "RUN_DIR/curves.png for one run, ./agro_runs.png for several.")
    labels: list[str] = _f([], "Legend labels, one per run in order (empty: the run directory names).")
    smooth: int = _f(5, "Moving-average window in steps for the per-step curves (1 = raw values only).")


@dataclass
class ReproConfig:
    """`agro repro`: the paper's LLM claims (c1 ... c5) and ours (c6: stale data; c7: asynchronous
    actors),
    reproduced with the real trainer, resumably."""

    claim: str = _f("", "Claim, also accepted as the first positional (agro repro c1 --out DIR); "
                    "`agro repro --list` names them.", ("c1", "c2", "c3", "c4", "c5", "c6", "c7"))
    out: str = _f("", "Output directory (required): runs.csv, arms.yaml, the plots, verdict.md.")
    quick: bool = _f(False, "The same pipeline on a tiny random model, a couple of steps per arm "
                     "(plumbing only; also the flag --quick).")
    store: str = _f("", "Run store (the big run directories, shared by claims so a common arm runs "
                    "once). Empty: runs/repro, or OUT/.store with quick.")
    seeds: list[int] = _f([], "Seeds (empty: 0,1,2; quick: 0,1).")
    arms: list[str] = _f([], "Only these arms of the claim (empty: all).")
    max_runs: int = _f(0, "Run at most this many pending runs, then write the outputs and stop "
                       "(0 = all). A sweep script commits between invocations.")
    render: bool = _f(False, "Run nothing: write the outputs from the runs finished so far (in "
                      "the store or recorded in OUT/runs), e.g. while the sweep runs elsewhere; "
                      "trains and evaluates nothing (a base-model evaluation found nowhere is an "
                      "error). Also the flag --render.")
    reuse: bool = _f(True, "Take a finished run recorded in OUT/runs/ (whatever code made it) or "
                     "in a sibling claim's outputs (a directory beside OUT whose arms.yaml names "
                     "a claim; only runs made by the code running now) when its config matches, "
                     "instead of running it again; likewise the base model's evaluation and the "
                     "offline file. A fresh clone re-renders from the committed ledger. false: "
                     "only the run store counts (a check that really re-runs).")


@dataclass
class LabConfig:
    """`agro lab`: exact tabular experiments, figure1 (agro_math.md §9) or pitfall (§4.6)."""

    # Which fields each experiment function (agro.lab.experiments) takes, and its defaults for the
    # fields whose default differs between them. tests/test_lab_cli.py checks both tables against
    # the functions' signatures, so they cannot drift.
    TAKES: typing.ClassVar[dict] = {
        "figure1": ("K", "beta", "n", "eta", "steps", "instances", "log_every", "seed", "methods",
                    "plot"),
        "pitfall": ("K", "p_ref", "successes", "n", "eta", "steps", "instances", "betas",
                    "lr_coefs", "lr_baseline", "log_every", "seed", "plot"),
    }
    DEFAULTS: typing.ClassVar[dict] = {
        "figure1": {"steps": 20000, "instances": 10, "log_every": 100},
        "pitfall": {"steps": 2000, "instances": 5, "log_every": 25},
    }

    experiment: str = _f("", "Experiment, also accepted as the first positional (agro lab figure1 "
                         "out=DIR): figure1 = AGRO vs KL-PG on off-policy data mu = pi_ref (§9); "
                         "pitfall = on-policy AGRO, Eq. 6, on binary-reward bandits (§4.6).",
                         ("figure1", "pitfall"))
    out: str = _f("", "Output directory (required): EXPERIMENT.csv and EXPERIMENT.png.")
    K: int = _f(10, "Number of actions (arms) of each bandit.")
    n: int = _f(4, "Samples per update (group size, >= 2).")
    eta: float = _f(0.5, "SGD step size on the logits.")
    steps: int = _f(0, "Number of updates (0 = the experiment's default: " + ", ".join(
        f"{e} {d['steps']}" for e, d in DEFAULTS.items()) + ").")
    instances: int = _f(0, "Random problem instances (0 = the experiment's default: " + ", ".join(
        f"{e} {d['instances']}" for e, d in DEFAULTS.items()) + ").")
    log_every: int = _f(0, "Log the metric every N updates (0 = the experiment's default: " +
                        ", ".join(f"{e} {d['log_every']}" for e, d in DEFAULTS.items()) + ").")
    seed: int = _f(0, "Seed of the problem instances and the sampled data.")
    plot: bool = _f(True, "Write the PNG as well as the CSV.")
    beta: float = _f(0.1, "(figure1) KL coefficient.")
    methods: list[str] = _f(["agro", "kl_pg"], "(figure1) Losses to compare (registered names of "
                            "agro.losses).")
    p_ref: float = _f(0.28, "(pitfall) Reference success probability, in (0, 1).")
    successes: int = _f(3, "(pitfall) Arms with reward 1 (the others have reward 0).")
    betas: list[float] = _f([0.1, 0.3], "(pitfall) KL coefficients, one run each.")
    lr_coefs: list[float] = _f([1.0, 0.0], "(pitfall) Weights on the likelihood-ratio part, one run "
                               "each (1 = exact Eq. 6, 0 = the PD part only).")
    lr_baseline: str = _f("none", "(pitfall) Baseline c in the likelihood-ratio weight (A^2 - c).",
                          ("none", "loo_var", "loo_sq"))


# --------------------------------------------------------------------------- machinery
def field_help(cls) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for every field of a config class."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        t = hints[f.name]
        tname = getattr(t, "__name__", str(t))
        h = f.metadata.get("help", "")
        if "choices" in f.metadata:
            h += f" Choices: {', '.join(map(str, f.metadata['choices']))}."
        out.append((f.name, tname, default, h))
    return out


def format_help(cls) -> str:
    lines = [cls.__doc__.strip(), "", "Fields (set in a YAML file or as key=value):"]
    for name, tname, default, h in field_help(cls):
        lines.append(f"  {name} ({tname}, default {default!r})")
        lines.append(f"      {h}")
    return "\n".join(lines)


def _coerce(name: str, t: Any, value: Any, where: str) -> Any:
    def bad(expected: str):
        return ConfigError(f"{where}: field '{name}' expects {expected}, got {value!r}")

    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad("a boolean (true/false)")
    if t is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    fv = float(value)
                except ValueError:
                    raise bad("an integer") from None
                if fv.is_integer():
                    return int(fv)
        raise bad("an integer")
    if t is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            v = float(value)
        elif isinstance(value, str):
            try:
                v = float(value)
            except ValueError:
                raise bad("a number") from None
        else:
            raise bad("a number")
        if not math.isfinite(v):
            raise bad("a finite number")
        return v
    if t is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    if t is dict:
        if isinstance(value, dict):
            return dict(value)
        if isinstance(value, str):
            try:
                v = yaml.safe_load(value)
            except yaml.YAMLError:
                v = None
            if isinstance(v, dict):
                return v
        raise bad("a mapping (e.g. {lr_coef: 0.5} or loss_options.lr_coef=0.5)")
    if typing.get_origin(t) is list:   # list[X]: a YAML list, a comma-separated string, or one X
        (item_t,) = typing.get_args(t)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [] if value is None else [value]
        return [_coerce(f"{name}[{i}]", item_t, v, where) for i, v in enumerate(value)]
    return value


def _yaml_value(text: str) -> Any:
    """Parse a command-line value the way YAML would (numbers, booleans, lists), else a string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _suggest(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"{hint} Valid keys: {', '.join(sorted(names))}."


def _yaml_lines(path: Path) -> dict[str, int]:
    """Line number of each top-level key in a YAML file (for error messages)."""
    lines: dict[str, int] = {}
    try:
        node = yaml.compose(path.read_text())
    except yaml.YAMLError:
        return lines
    if isinstance(node, yaml.MappingNode):
        for k, _v in node.value:
            lines[str(k.value)] = k.start_mark.line + 1
    return lines


def load_config(cls, yaml_path: str | None = None, overrides: list[str] | None = None):
    """Build and validate a config: defaults < YAML file < ``key=value`` overrides."""
    names = [f.name for f in fields(cls)]
    hints = typing.get_type_hints(cls)
    raw: dict[str, tuple[Any, str]] = {}
    if yaml_path:
        p = Path(yaml_path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of field: value")
        lines = _yaml_lines(p)
        in_file: dict[str, str] = {}
        for k, v in data.items():
            where = f"{p}:{lines.get(str(k), '?')}"
            raw[_current_name(str(k), in_file, where, names)] = (v, where)
    on_line: dict[str, str] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"argument {item!r}: expected key=value.{_suggest(item, names)}")
        k, v = item.split("=", 1)
        k = k.strip()
        where = f"command line '{item}'"
        k = _current_name(k, on_line, where, names)
        if "." in k:  # dotted keys set one entry of a dict field, e.g. loss_options.lr_coef=0.5
            head, sub = k.split(".", 1)
            if head in names and hints[head] is dict:
                prev = raw.get(head, ({}, where))[0]
                prev = dict(prev) if isinstance(prev, dict) else {}
                prev[sub] = _yaml_value(v)
                raw[head] = (prev, where)
                continue
        raw[k] = (_yaml_value(v), where)
    return _build(cls, raw)


def config_from_dict(cls, data: dict[str, Any], where: str = "settings"):
    """Build and validate a config from a mapping of field: value (errors name ``where``)."""
    seen: dict[str, str] = {}
    names = [f.name for f in fields(cls)]
    return _build(cls, {_current_name(str(k), seen, f"{where} '{k}'", names): (v, f"{where} '{k}'")
                        for k, v in data.items()})


# Fields renamed since they were first written (old name -> new): configs and run directories
# written before still load (a file's old name and a command line's new one: the command line
# wins, as for any field), and a repro ledger's recorded configs compare under the new names.
RENAMED = {"vllm_on_policy": "sampler_on_policy", "vllm_mismatch_tol": "sampler_mismatch_tol"}


def renamed(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with renamed fields under their current names (:data:`RENAMED`)."""
    return {RENAMED.get(k, k): v for k, v in data.items()}


def _current_name(key: str, seen: dict[str, str], where: str, names: list[str]) -> str:
    """``key`` (``field`` or ``field.entry``) under the field's current name, if ``names`` (the
    config's fields) has it. ``seen``: this source's fields so far, {current name: name as
    written}; one source naming a field both ways is an error (which did it mean?)."""
    head, dot, rest = key.partition(".")
    cur = RENAMED[head] if RENAMED.get(head) in names else head
    if seen.get(cur, head) != head:
        raise ConfigError(f"{where}: '{head}' and '{seen[cur]}' are the same field "
                          f"('{cur}'; the other is its old name); keep one")
    seen[cur] = head
    return cur + dot + rest


def _build(cls, raw: dict[str, tuple[Any, str]]):
    names = [f.name for f in fields(cls)]
    hints = typing.get_type_hints(cls)
    choices = {f.name: f.metadata.get("choices", ()) for f in fields(cls)}
    kwargs = {}
    for k, (v, where) in raw.items():
        if k not in names:
            raise ConfigError(f"{where}: unknown key '{k}'.{_suggest(k, names)}")
        if isinstance(v, bool) and hints[k] is str and {"yes", "no"} <= set(choices[k]):
            v = "yes" if v else "no"      # YAML 1.1 reads a bare yes/no as a boolean
        kwargs[k] = _coerce(k, hints[k], v, where)
    cfg = cls(**kwargs)
    validate(cfg, {k: w for k, (_, w) in raw.items()})
    return cfg


def _check(cond: bool, key: str, where: dict[str, str], msg: str) -> None:
    if not cond:
        loc = where.get(key, "default")
        raise ConfigError(f"{loc}: field '{key}' {msg}")


def parse_source(spec: str) -> dict[str, float]:
    """'fresh' -> {'fresh': 1.0}; 'fresh:0.5,offline:0.5' -> weights (normalised)."""
    from .rollouts import SOURCES

    out: dict[str, float] = {}
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, w = part.partition(":")
        name = name.strip()
        if name not in SOURCES:
            raise ConfigError(f"unknown source '{name}' in {spec!r}; valid: {', '.join(SOURCES)}")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise ConfigError(f"source weight for '{name}' must be a number, got {w!r}") from None
        if not (weight > 0 and math.isfinite(weight)):
            raise ConfigError(f"source weight for '{name}' must be > 0, got {w!r}")
        out[name] = out.get(name, 0.0) + weight
    if not out:
        raise ConfigError("source is empty; valid: " + ", ".join(SOURCES))
    total = sum(out.values())
    return {k: v / total for k, v in out.items()}


def validate(cfg, where: dict[str, str] | None = None) -> None:
    """Range and cross-field checks. Raises ConfigError; never touches a model."""
    w = where or {}
    c = _check
    for f in fields(cfg):
        ch = f.metadata.get("choices")
        if ch is not None:
            c(getattr(cfg, f.name) in ch, f.name, w,
              f"must be one of {', '.join(map(str, ch))}, got {getattr(cfg, f.name)!r}")
    if isinstance(cfg, ModelFields):
        c(cfg.num_threads >= 0, "num_threads", w, "must be >= 0")
        c(bool(cfg.model), "model", w, "must not be empty")
    if isinstance(cfg, TaskFields):
        c(cfg.arithmetic_level >= 1, "arithmetic_level", w, "must be >= 1")
        if cfg.arithmetic_range:
            from .tasks import parse_arith_range
            try:
                parse_arith_range(cfg.arithmetic_range)
            except ValueError as e:
                c(False, "arithmetic_range", w, str(e))
        c(cfg.reward_timeout > 0, "reward_timeout", w, "must be > 0")
        c(cfg.max_prompt_tokens >= 1, "max_prompt_tokens", w, "must be >= 1")
        if cfg.task in ("math", "gsm8k"):
            c(bool(cfg.data_path), "data_path", w,
              f"is required for task={cfg.task} (a local .jsonl/.parquet file or a datasets name)")
    if isinstance(cfg, SamplingFields):
        c(cfg.max_new_tokens >= 1, "max_new_tokens", w, "must be >= 1")
        c(cfg.temperature > 0, "temperature", w, "must be > 0")
        c(0 < cfg.top_p <= 1, "top_p", w, "must be in (0, 1]")
        c(cfg.top_k >= 0, "top_k", w, "must be >= 0")
        c(cfg.generation_batch_size >= 1, "generation_batch_size", w, "must be >= 1")
        c(cfg.group_size >= 1, "group_size", w, "must be >= 1")
        if cfg.generator == "vllm":   # before any model loads; find_spec does not import vLLM
            import importlib.util

            c(importlib.util.find_spec("vllm") is not None, "generator", w,
              "is 'vllm' but vLLM is not installed in this Python: `make vllm-setup` and run "
              ".venv-vllm/bin/agro (CPU), or `pip install 'agro[vllm]'` (GPU)")
        c(cfg.vllm_sync_every >= 1, "vllm_sync_every", w, "must be >= 1")
        c(cfg.sampler_mismatch_tol >= 0, "sampler_mismatch_tol", w, "must be >= 0")
        c(cfg.vllm_kv_cache_gib >= 1, "vllm_kv_cache_gib", w, "must be >= 1")
        c(0 < cfg.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization", w, "must be in (0, 1]")
    if isinstance(cfg, EvalBatchFields):
        c(cfg.eval_batch_size >= 0, "eval_batch_size", w, "must be >= 0 (0 = auto)")
    if isinstance(cfg, TrainConfig):
        from . import losses

        valid = losses.available_losses()
        c(cfg.loss in valid, "loss", w, f"must be one of {', '.join(valid)}, got {cfg.loss!r}")
        c(cfg.beta >= 0, "beta", w, f"must be >= 0, got {cfg.beta}")
        c(cfg.group_size >= 2, "group_size", w,
          f"must be >= 2 for loss {cfg.loss} (it uses a leave-one-out baseline over the group)")
        spec = losses.loss_spec(cfg.loss)
        opts = spec.options
        for k in cfg.loss_options:
            c(k in opts, "loss_options", w,
              f"has unknown option '{k}' for loss {cfg.loss}; valid: {', '.join(sorted(opts)) or 'none'}")
        c(not spec.beta_positive or cfg.beta > 0, "beta", w,
          f"must be > 0 for loss {cfg.loss} (the registry says it divides by beta), got {cfg.beta}")
        try:   # the registry's own checks of the option values (the same ones compute_loss runs)
            spec.validate(cfg.beta, cfg.group_size, cfg.loss_options)
        except ValueError as e:
            c(False, "loss_options", w, f"is invalid: {e}")
        c(cfg.offline_check_rows >= 0, "offline_check_rows", w, "must be >= 0")
        c(cfg.steps >= 1, "steps", w, "must be >= 1")
        c(cfg.prompts_per_step >= 1, "prompts_per_step", w, "must be >= 1")
        c(cfg.micro_batch_groups >= 1, "micro_batch_groups", w, "must be >= 1")
        c(cfg.micro_batch_tokens >= -1, "micro_batch_tokens", w,
          "must be >= 0 (0: no limit) or -1 (by precision)")
        c(cfg.lr > 0, "lr", w, "must be > 0")
        c(cfg.warmup_steps >= 0, "warmup_steps", w, "must be >= 0")
        c(cfg.weight_decay >= 0, "weight_decay", w, "must be >= 0")
        c(0 <= cfg.adam_beta1 < 1 and 0 <= cfg.adam_beta2 < 1, "adam_beta1", w,
          "and adam_beta2 must be in [0, 1)")
        c(cfg.max_grad_norm >= 0, "max_grad_norm", w, "must be >= 0")
        c(cfg.lora_r >= 1, "lora_r", w, "must be >= 1")
        c(cfg.lora_dropout == 0, "lora_dropout", w,
          f"must be 0, got {cfg.lora_dropout}: agro scores in eval mode, so dropout would have no "
          "effect (with it active, log pi/pi_ref != 0 at step 0 and on-policy terms are biased)")
        c(0 <= cfg.replay_prob <= 1, "replay_prob", w, f"must be in [0, 1], got {cfg.replay_prob}")
        c(cfg.replay_capacity >= 1, "replay_capacity", w, "must be >= 1")
        c(cfg.stale_lag >= 0, "stale_lag", w, "must be >= 0")
        c(cfg.max_staleness >= 0, "max_staleness", w, "must be >= 0")
        c(cfg.async_actors >= 1, "async_actors", w, "must be >= 1")
        c(cfg.async_actor_cpus >= 1, "async_actor_cpus", w, "must be >= 1")
        c(cfg.async_actor_gpus >= 0, "async_actor_gpus", w, "must be >= 0")
        c(cfg.async_timeout > 0, "async_timeout", w, "must be > 0")
        c(cfg.async_max_restarts >= 0, "async_max_restarts", w, "must be >= 0")
        if cfg.async_generation:   # before any model loads; find_spec does not import Ray
            import importlib.util

            c(importlib.util.find_spec("ray") is not None, "async_generation", w,
              "is true but Ray is not installed in this Python: `pip install 'agro[async]'`")
            c(cfg.source == "fresh", "source", w,
              f"must be 'fresh' with async_generation=true (the actors make the fresh groups; "
              f"their lag is max_staleness), got {cfg.source!r}")
        c(cfg.save_every >= 0, "save_every", w, "must be >= 0")
        c(cfg.keep_checkpoints >= 1, "keep_checkpoints", w, "must be >= 1")
        c(cfg.eval_prompts >= 0 and cfg.eval_samples >= 1, "eval_prompts", w,
          "must be >= 0 (and eval_samples >= 1)")
        c(cfg.max_consecutive_skips >= 1, "max_consecutive_skips", w, "must be >= 1")
        try:
            mix = parse_source(cfg.source)
        except ConfigError as e:
            raise ConfigError(f"{w.get('source', 'default')}: field 'source': {e}") from None
        if "offline" in mix:
            c(bool(cfg.offline_path), "source", w,
              "includes 'offline', so offline_path must name a file written by `agro generate`")
            for p in cfg.offline_path.split(","):
                c(Path(p.strip()).exists(), "offline_path", w, f"names a file that does not exist: {p.strip()}")
    if isinstance(cfg, GenerateConfig):
        c(cfg.num_prompts >= 1, "num_prompts", w, "must be >= 1")
        c(cfg.group_size >= 2, "group_size", w, "must be >= 2 (groups are the training unit)")
        c(cfg.output.endswith((".jsonl", ".parquet")), "output", w, "must end in .jsonl or .parquet")
    if isinstance(cfg, EvalConfig):
        c(cfg.num_prompts >= 1, "num_prompts", w, "must be >= 1")
        c(cfg.samples >= 0, "samples", w, "must be >= 0")
    if isinstance(cfg, PlotConfig):
        c(bool(cfg.runs), "runs", w, "needs at least one run directory (agro plot RUN_DIR...)")
        for r in cfg.runs:
            c((Path(r) / "metrics.jsonl").is_file(), "runs", w,
              f"names {r}, which has no metrics.jsonl (is it an agro run directory?)")
        c(not cfg.labels or len(cfg.labels) == len(cfg.runs), "labels", w,
          f"has {len(cfg.labels)} labels for {len(cfg.runs)} runs (give one per run, or none)")
        c(cfg.smooth >= 1, "smooth", w, f"must be >= 1, got {cfg.smooth}")
    if isinstance(cfg, ReproConfig):
        c(bool(cfg.out), "out", w, f"is required: the output directory (agro repro "
          f"{cfg.claim or 'c1'} --out DIR)")
        c(cfg.max_runs >= 0, "max_runs", w, "must be >= 0")
        if cfg.claim:
            from .repro.claims import CLAIMS
            bad = [a for a in cfg.arms if a not in CLAIMS[cfg.claim].arms]
            c(not bad, "arms", w, f"names {bad[:1]}, not an arm of {cfg.claim}; its arms: "
              f"{', '.join(CLAIMS[cfg.claim].arms)}")
    if isinstance(cfg, LabConfig):
        from . import losses

        c(bool(cfg.out), "out", w, "is required: the output directory (agro lab "
          f"{cfg.experiment or 'figure1'} out=DIR)")
        takes = cfg.TAKES[cfg.experiment]
        for k in w:
            if k in cfg.TAKES["figure1"] + cfg.TAKES["pitfall"]:
                c(k in takes, k, w, f"does not apply to experiment {cfg.experiment}")
        c(cfg.K >= 2, "K", w, f"must be >= 2, got {cfg.K}")
        c(cfg.n >= 2, "n", w, f"must be >= 2 (leave-one-out baselines), got {cfg.n}")
        c(cfg.eta > 0, "eta", w, f"must be > 0, got {cfg.eta}")
        for k in ("steps", "instances", "log_every"):
            c(getattr(cfg, k) >= 0, k, w, f"must be >= 0 (0 = the experiment's default), "
              f"got {getattr(cfg, k)}")
        if cfg.experiment == "figure1":
            c(cfg.beta > 0, "beta", w, f"must be > 0, got {cfg.beta}")
            valid = losses.available_losses()
            c(bool(cfg.methods), "methods", w, "must name at least one loss")
            for m in cfg.methods:
                c(m in valid, "methods", w, f"has unknown loss '{m}'; valid: {', '.join(valid)}")
        else:
            c(0 < cfg.p_ref < 1, "p_ref", w, f"must be in (0, 1), got {cfg.p_ref}")
            c(1 <= cfg.successes < cfg.K, "successes", w, f"must be in [1, K), got {cfg.successes}")
            c(bool(cfg.betas) and all(b > 0 for b in cfg.betas), "betas", w,
              f"must be one or more numbers > 0, got {cfg.betas}")
            c(bool(cfg.lr_coefs), "lr_coefs", w, "must hold at least one number")


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg, path: Path, comments: list[str] | None = None) -> None:
    """Write ``cfg`` as YAML (atomically); ``comments`` become ``#`` lines at the top (facts about
    the run that are not settings, e.g. why precision=auto chose what it chose)."""
    from .fileio import atomic_write_text

    head = "".join(f"# {c}\n" for c in comments or [])
    atomic_write_text(path, head + yaml.safe_dump(to_dict(cfg), sort_keys=False))

