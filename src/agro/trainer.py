"""The AGRO trainer: collect -> score -> mix -> loss -> step -> log -> checkpoint.

Read top to bottom: :meth:`Trainer.__init__` composes the parts from the shared builders
(:mod:`agro.builders`: models, generator, grader, collector) plus the sources, optimizer and
logger; :meth:`Trainer.train` runs the loop; :meth:`Trainer.learn` is one optimizer step over whole
groups; :meth:`save` / :meth:`_resume` hold everything needed to continue bit-identically.

The trainer has no branch per loss: it calls ``agro.losses.compute_loss(cfg.loss, ...)`` and asks
the registry (:func:`agro.losses.loss_spec`) which inputs a loss takes (``on_policy`` flags, the
full-vocabulary ``token_kl``). It has no knowledge of a source's internals: it asks the mixer for
``prompts_per_step`` groups. Every collated batch moves to the policy's device in one place
(:meth:`learn`), and every log-prob pass runs in eval mode (:func:`agro.logprobs.batch_logprobs`),
so dropout never makes the learner's log-probs differ from the sampler's and the reference's.

Departures from the paper (documented, deliberate):
- Groups that are not fresh temperature-1 samples of the current policy are marked off-policy, so
  on-policy-only terms (agro_on's LR term, the causal/local estimators) switch off for them.
- Data parallelism: each process holds whole groups; every sample weighs 1 / (global sample
  count) and gradients are summed over processes (:mod:`agro.distributed`), so N processes equal
  one process on the union of their groups, even when they hold different numbers of groups.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from . import losses
from .allocator import in_use as allocator_in_use
from .builders import (build_collector, build_generator, build_grader, build_models,
                       choose_linear_backend, sampling_params, setup_runtime)
from .checkpoint import (
    BackgroundSaver, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
)
from .collect import CollectStats
from .config import TrainConfig, dump_yaml, micro_batch_tokens_for, parse_source, to_dict
from .datafiles import read_groups
from .distributed import Distributed
from .evaluation import eval_random_stream, evaluate
from .faults import maybe_crash
from .logging_utils import MetricsLogger, TrainProgress
from .logprobs import batch_logprobs, token_kl
from .models import MasterWeights, grad_accum_fp32, is_peft, save_for_transformers
from .perf import (CALIBRATION_PROMPT_LEN, FlopModel, batch_flops, calibrate_precision, machine_key,
                   matmul_peak, phase_rates)
from .provenance import check_offline_groups, reference_identity
from .rollouts import Group, collate, samples_from_pi, split_groups
from .sampler_check import keep_random_state
from .sources import build_mixer
from .tasks import build_task

__all__ = ["Trainer", "TrainResult", "TrainingAborted", "train"]


class TrainingAborted(RuntimeError):
    """Raised when training cannot continue safely (e.g. K consecutive non-finite steps)."""


@dataclass
class TrainResult:
    output_dir: Path
    steps_done: int
    before: dict | None
    after: dict | None
    final_dir: Path | None
    plot_path: Path | None


# Collector counters reported per step (metrics.jsonl) and summed over the run (end report).
COUNTERS = ("prompts_too_long", "gold_unparsable", "grade_timeouts", "grade_errors")


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_schedule == "cosine":
            span = max(1, cfg.steps - cfg.warmup_steps)
            prog = min(1.0, (step - cfg.warmup_steps) / span)
            return 0.5 * (1.0 + math.cos(math.pi * prog))
        return 1.0
    return f


def make_adamw(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for these tensors (CPU and CUDA floats):
    the same update as the default multi-tensor kernel, measured 0.08 s vs 0.58 s per step for
    SmolLM2-135M's 128M parameters on this CPU."""
    kw = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    devices = {p.device.type for p in params}
    if devices <= {"cpu", "cuda"} and all(p.dtype.is_floating_point for p in params):
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(params, **kw)


@dataclass
class RunCounters:
    """What the run counted, summed over steps (resumable, reported at the end)."""

    collect: dict[str, int] = field(default_factory=lambda: {k: 0 for k in COUNTERS})
    skipped_rows: dict[str, int] = field(default_factory=dict)   # offline bad rows, per file:reason
    empty_steps: int = 0                                         # steps with no group on any process


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, grader=None):
        self.dist = Distributed()
        if cfg.prompts_per_step % self.dist.world:
            raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be divisible by the "
                             f"number of processes ({self.dist.world}): it is the global batch")
        self.local_prompts = cfg.prompts_per_step // self.dist.world
        if cfg.generator == "vllm" and self.dist.world > 1 and not cfg.async_generation:
            raise ValueError("generator=vllm runs one in-process engine, for one process: with "
                             f"{self.dist.world} processes every engine would take the first "
                             "device and its process group. Use async_generation=true (each "
                             "actor holds its own engine), or generator=cached with data "
                             "parallel")
        self.device = self.dist.device
        self.out = Path(cfg.output_dir)
        self.ckpt_path = latest_checkpoint(self.out) if resume else None
        if resume and self.ckpt_path is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {self.out / 'checkpoints'}")
        requested_precision = cfg.precision
        self.cfg = cfg = setup_runtime(cfg, rank=self.dist.rank, device=self.device)
        if cfg.async_generation:
            from .async_actors import learner_threads

            threads = learner_threads(cfg)
            if threads is not None:
                torch.set_num_threads(threads)
                self.note(f"async_generation: the learner keeps {threads} torch thread(s), the "
                          f"{cfg.async_actors} actor(s) {cfg.async_actor_cpus} each")
        if self.dist.world > 1:
            self.note(f"data parallel: {self.dist.world} processes x {self.local_prompts} prompt "
                      f"groups each = {cfg.prompts_per_step} per step ({self.device})")
        if self.ckpt_path is None:
            self._claim_output_dir(cfg.overwrite)
        self.out.mkdir(parents=True, exist_ok=True)
        self.counters = RunCounters()
        self.task = build_task(cfg)
        for line in self.task.notes:
            self.note(line)
        self.sampler = self.task.train_sampler(cfg.seed + 7 * self.dist.rank)
        self.policy, self.tok, self.reference = build_models(cfg, device=self.device)
        # before precision=auto's timing, whose fp32 passes then run on the chosen GEMMs
        linear = self._linear_backend(requested_precision)
        # (a resumed run's header comes back from _auto_precision: a new linear line replaces its own)
        self.precision_notes = linear + [x for x in self._auto_precision(requested_precision)
                                         if not (linear and x.startswith("linear_backend:"))]
        if self.cfg.micro_batch_tokens < 0:   # by precision, now that it is known (config.yaml)
            self.cfg = dataclasses.replace(self.cfg,
                                           micro_batch_tokens=micro_batch_tokens_for(self.cfg))
            line = (f"micro_batch_tokens: -1 -> {self.cfg.micro_batch_tokens} "
                    f"(the default for {self.cfg.precision})")
            self.precision_notes.append(line)
            self.note(line)
        cfg = self.cfg
        if self.dist.is_main:
            dump_yaml(cfg, self.out / "config.yaml", self.precision_notes)
        # bf16 full fine-tuning: bf16 working weights (learner and sampler) over fp32 masters, and
        # a bf16 reference (agro.models.MasterWeights); fp32 and LoRA: the policy itself
        if cfg.precision == "bf16":   # first: the working copy is then the only transient copy
            self.reference.store_bf16(keep_digest="offline" in parse_source(cfg.source))
        self.mixed = (MasterWeights(self.policy)
                      if cfg.precision == "bf16" and not is_peft(self.policy) else None)
        self.learner = self.mixed.work if self.mixed else self.policy
        self.accum_fp32 = grad_accum_fp32(cfg.grad_accum, self.device)
        self.flops = FlopModel.of(self.policy)
        self.peak = matmul_peak(self.flops, torch.bfloat16 if cfg.precision == "bf16"
                                else torch.float32, self.device,
                                onednn=cfg.linear_backend in ("onednn", "onednn_fwd"))
        self.note(f"precision {cfg.precision} on {self.device}; measured GEMM peak "
                  f"{self.peak / 1e9:.0f} GFLOP/s ({machine_key(self.device)}); "
                  f"allocator {allocator_in_use()}")
        # async: the actors sample; the learner's own sampler only evaluates, and is agro's own
        # (no second vLLM engine per learner process; every rank may hold one)
        self.generator = build_generator(
            dataclasses.replace(cfg, generator="cached") if cfg.async_generation
            and cfg.generator == "vllm" else cfg, self.learner, self.tok)
        self._own_grader = grader is None      # a grader passed in is the caller's to close
        self.grader = build_grader(cfg, grader)
        self.collector = build_collector(cfg, tokenizer=self.tok, generator=self.generator,
                                         grader=self.grader, reference=self.reference,
                                         sampler=self.sampler, flop_model=self.flops)
        mix = parse_source(cfg.source)
        self.mixer = build_mixer(mix, self.collector, offline_groups=self._offline_groups(mix),
                                 replay_capacity=cfg.replay_capacity, replay_prob=cfg.replay_prob,
                                 stale_lag=cfg.stale_lag, seed=cfg.seed,
                                 rank=self.dist.rank, world=self.dist.world)
        self.async_source = None
        try:   # from here on the actors exist: a failure must not leave them running
            if cfg.async_generation:
                self.async_source = self._async_source()
            self._init_rest(cfg)
        except BaseException:
            self.close_generator()
            raise

    def _init_rest(self, cfg: TrainConfig) -> None:
        """The rest of :meth:`__init__`: optimizer, loss, resume, sampler check, logger."""
        self.trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = make_adamw(self.trainable, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.loss = losses.loss_spec(cfg.loss)
        # checkpoints written while the next step samples and scores (one process: with several,
        # every rank's state is gathered at the save and rank 0 writes it synchronously)
        self.saver = BackgroundSaver() if cfg.save_async and self.dist.world == 1 else None
        if cfg.save_async and self.dist.world > 1 and self.dist.is_main:
            self.note("save_async: checkpoints are written synchronously with several processes")
        self.needs_token_kl = self.loss.needs_token_kl(cfg.loss_options)
        if not samples_from_pi(cfg.temperature, cfg.top_p, cfg.top_k):
            self.note(f"sampling with temperature={cfg.temperature}, top_p={cfg.top_p}, "
                      f"top_k={cfg.top_k} does not draw from pi: fresh groups are treated as "
                      "off-policy (on-policy-only loss terms are off, §4.2)")
        self.step = self.version = 0
        self.consecutive_skips = self.total_skipped_steps = 0
        self.before: dict | None = None
        self._resumed_sampler_check = None
        if self.ckpt_path is not None:
            self._resume()
        self.sampler_record = None
        self.sampler_notes = self._check_sampler()
        warning = self.loss.start_warning(cfg.loss_options, cfg.beta)   # e.g. §4.6's pitfall
        if warning and self._on_policy_terms_in_use() \
                and (self.sampler_record or {}).get("exact", True):
            self.note(warning)      # only where the on-policy terms are in use
        self.logger = MetricsLogger(self.out, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                                    wandb_project=cfg.wandb_project, config=to_dict(cfg),
                                    resume_step=self.step if self.ckpt_path else None) \
            if self.dist.is_main else None

    def _async_source(self):
        """async_generation: Ray rollout actors ahead of the learner by max_staleness versions
        (:mod:`agro.async_actors`). Rank 0 owns the actors and hands every process its slice;
        the actors get this run's config with the precision it chose. Replaces the mixer."""
        from .async_actors import ActorPool, AsyncSource, FollowerSource, LeaderSource
        from .sources import Mixer

        cfg = self.cfg
        if self.dist.is_main:
            from .grading import Grader

            # a grader passed in goes to the actors (it must pickle), except agro's own sandboxed
            # one, shared across runs by `agro repro`: each actor starts its own, the same
            portable = not (self._own_grader or isinstance(self.grader, Grader))
            pool = ActorPool(cfg, to_dict(cfg), self.grader if portable else None)
            who = ", ".join(f"pid {i['pid']}: {i['threads']} thread(s)" for i in pool.info)
            self.note(f"async_generation: {len(pool)} rollout actor(s) ({who}), "
                      f"max_staleness={cfg.max_staleness}")
            src = AsyncSource(pool, self.collector, self.policy, cfg.max_staleness, cfg.seed,
                              note=self.note, steps=cfg.steps)
            if self.dist.world > 1:
                src = LeaderSource(src, self.dist)
        else:
            src = FollowerSource(self.dist)
        self.mixer = Mixer({"fresh": src}, {"fresh": 1.0}, cfg.seed)
        return src

    def _linear_backend(self, requested_precision: str) -> list[str]:
        """linear_backend (:mod:`agro.onednn_linear`): rank 0 resolves 'auto' (a timing of this
        model's fp32 linear shapes on both GEMM libraries, cached per machine) once every
        process has loaded its models; every process installs rank 0's choice on the policy and
        the reference (falling back to aten where oneDNN cannot run there). A resumed run keeps
        the choice its config.yaml records (aten for a run from before the setting existed; its
        header lines come back through :meth:`_auto_precision`) unless another is set. Returns
        the lines for the log and config.yaml's header."""
        cfg = self.cfg
        ref_model = self.reference.model
        saved = None      # rank 0 reads the run's record; every process branches on the same value
        if self.ckpt_path is not None and self.dist.is_main:
            saved = (yaml.safe_load((self.out / "config.yaml").read_text()) or {}).get(
                "linear_backend", "aten")
        saved = self.dist.broadcast(saved)
        if saved is not None:
            if saved in ("aten", "onednn", "onednn_fwd") and cfg.linear_backend in ("auto", saved):
                self.cfg, line = choose_linear_backend(
                    dataclasses.replace(cfg, linear_backend=saved), self.policy, ref_model,
                    bf16=False, follow=True)
                if self.cfg.linear_backend == saved:
                    return []
                self.note(line)
                return [line]
        self.dist.barrier()              # rank 0 times with every process's start-up done
        msg, err = None, None
        if self.dist.is_main:
            try:
                got, line = choose_linear_backend(cfg, self.policy, ref_model,
                                                  bf16=requested_precision == "bf16")
                msg = (got.linear_backend, line, None)
            except Exception as e:       # every process hears of it, then rank 0 raises it
                err, msg = e, (None, None, f"{type(e).__name__}: {e}")
        backend, line, failed = self.dist.broadcast(msg)
        if err is not None:
            raise err
        if failed:
            raise RuntimeError(f"linear_backend on rank 0: {failed}")
        if not self.dist.is_main:
            choose_linear_backend(dataclasses.replace(cfg, linear_backend=backend), self.policy,
                                  ref_model, bf16=False, follow=True)
        self.cfg = dataclasses.replace(self.cfg, linear_backend=backend)
        self.note(line)
        return [line]

    def _auto_precision(self, requested: str) -> list[str]:
        """precision=auto: where bf16 is native on this CPU, time this model's learner, reference
        and sampling passes in fp32 and bf16 (:func:`agro.perf.calibrate_precision`, cached per
        machine) and keep the faster; every process uses rank 0's choice. Returns the lines that
        say what was chosen and why (logged, and written atop config.yaml)."""
        cfg = self.cfg
        if self.ckpt_path is not None:   # resuming: config.yaml keeps its own record of the choice
            text = (self.out / "config.yaml").read_text()
            saved = (yaml.safe_load(text) or {}).get("precision")
            if requested == "auto" and saved in ("fp32", "bf16") and saved != cfg.precision:
                self.cfg = dataclasses.replace(cfg, precision=saved)    # the run's own choice
                self.reference.precision = saved
            return [x[2:] for x in text.splitlines() if x.startswith("# ")] or \
                [f"precision: {self.cfg.precision} (from the resumed run's config.yaml)"]
        if requested != "auto":
            return [f"precision: {cfg.precision} (set explicitly)"]
        if self._on_policy_terms_in_use() and cfg.sampler_on_policy == "auto":
            # correctness before speed: in bf16 agro's own sampler is 0.2-0.35 nats per
            # completion from the learner (docs/RESULTS.md), so the sampler check would turn these
            # terms off
            if cfg.precision != "fp32":
                self.cfg = dataclasses.replace(cfg, precision="fp32")
                self.reference.precision = "fp32"
            line = (f"precision: auto -> fp32 (loss {cfg.loss} has on-policy-only terms, which "
                    "need samples from pi; bf16 sampling is too far from the learner's "
                    "log-probs for them: precision=bf16 trades them for speed)")
            self.note(line)
            return [line]
        # every process follows rank 0: its flags decide whether to time, its timing decides
        rank0 = self.dist.all_gather(cfg.precision)[0]
        timed = self.dist.all_gather(cfg.precision == "bf16" and self.device.type == "cpu")[0]
        if not timed:
            if rank0 != cfg.precision:
                self.cfg = dataclasses.replace(cfg, precision=rank0)
                self.reference.precision = rank0
            why = (f"native bf16 on {self.device}" if rank0 == "bf16"
                   else f"no native bf16 matmuls on this {self.device.type}")
            return [f"precision: auto -> {rank0} ({why})"]
        per_mb = cfg.micro_batch_groups   # groups per micro-batch, at worst (longest completions)
        budget = micro_batch_tokens_for(cfg, "bf16")   # micro-batches count in bf16's estimate only
        if budget:
            per_mb = max(1, min(per_mb, budget //
                                (CALIBRATION_PROMPT_LEN + cfg.group_size * cfg.max_new_tokens)))
        cal = calibrate_precision(self.policy, prompts_per_step=self.local_prompts,
                                  group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                                  micro_batches=-(-self.local_prompts // per_mb),
                                  accum_fp32=grad_accum_fp32(cfg.grad_accum, self.device)) \
            if self.dist.is_main else None
        cal = self.dist.all_gather(cal)[0]
        choice = cal["choice"]
        f32, b16 = cal["fp32"], cal["bf16"]
        lines = [f"precision: auto -> {choice} (measured on this machine{', cached' if cal['cached'] else ''}: "
                 f"estimated step fp32 {f32['step']:.2f} s vs bf16 {b16['step']:.2f} s)",
                 f"  seconds fp32/bf16: learner pass {f32['learner']:.3f}/{b16['learner']:.3f}, "
                 f"reference pass {f32['reference']:.3f}/{b16['reference']:.3f}, "
                 f"8 sampling steps {f32['sample']:.3f}/{b16['sample']:.3f}, "
                 f"bf16 grads -> fp32 masters -> bf16 {b16.get('update', 0.0):.3f}"]
        for line in lines:
            self.note(line)
        if choice != cfg.precision:
            self.cfg = dataclasses.replace(cfg, precision=choice)
            self.reference.precision = choice
        return lines

    def _offline_groups(self, mix: dict[str, float]) -> list[Group] | None:
        """Read and validate every offline file, and check that its reference log-probs are this
        run's (:func:`agro.provenance.check_offline_groups`: the recorded reference identity, then
        a recomputation of ``offline_check_rows`` rows). None when the mix has no offline part."""
        if "offline" not in mix:
            return None
        cfg = self.cfg
        identity = reference_identity(cfg.model, self.reference, self.tok, cfg.precision)
        groups: list[Group] = []
        for p in cfg.offline_path.split(","):
            path = Path(p.strip())
            gs, report = read_groups(path, skip_bad_rows=cfg.skip_bad_rows, vocab_size=len(self.tok))
            check = check_offline_groups(path, gs, identity=identity, reference=self.reference,
                                         tokenizer=self.tok, precision=cfg.precision,
                                         rows=cfg.offline_check_rows,
                                         trust=cfg.trust_offline_reference, warn=self.note)
            self.note(check.summary())
            for k, v in report.counts.items():
                key = f"offline:{k}"
                self.counters.skipped_rows[key] = self.counters.skipped_rows.get(key, 0) + v
            groups += gs
        bad_n = [g.prompt_id for g in groups if g.n != cfg.group_size]
        if bad_n:
            raise ValueError(f"offline groups have a group size other than group_size="
                             f"{cfg.group_size} (e.g. {bad_n[0]!r}); set group_size to match")
        return groups

    # what marks a directory as holding an earlier run, and what a run writes there
    RUN_MARKERS = ("metrics.jsonl", "checkpoints", "final")
    RUN_FILES = RUN_MARKERS + ("events.jsonl", "config.yaml", "curves.png", "tb",
                               "wandb_run_id.txt", "wandb")

    def _claim_output_dir(self, overwrite: bool) -> None:
        """A new run must not append to an earlier run's files (metrics.jsonl would then hold
        two runs, and a later --resume could pick the earlier run's checkpoint). A directory
        with only a config.yaml is a start that failed in set-up: it is simply reused. Rank 0
        decides for every process."""
        cfg = self.cfg
        verdict = None
        if self.dist.is_main:
            try:
                verdict = self._clear_output_dir(cfg, overwrite)
            except OSError as e:   # every process must hear of it, not wait for rank 0
                verdict = f"output_dir {self.out}: could not replace the earlier run: {e}"
        verdict = self.dist.all_gather(verdict)[0]
        if verdict is not None:
            raise FileExistsError(verdict)

    def close_generator(self) -> None:
        """Free a sampler that holds its own memory (vLLM: weights and KV cache)."""
        close = getattr(self.generator, "close", None)
        if close is not None:
            close()
        if getattr(self, "async_source", None) is not None:
            self.async_source.close()

    def _clear_output_dir(self, cfg, overwrite: bool) -> str | None:
        """Rank 0's part of :meth:`_claim_output_dir`: the refusal message, or None once the
        directory is free (files deleted only with ``overwrite``, or a lone config.yaml)."""
        present = [n for n in self.RUN_FILES if (self.out / n).exists()]
        if not present:
            return None
        if present != ["config.yaml"] and not overwrite:
            how = (f"continue it with `agro train --resume {self.out}`, "
                   if latest_checkpoint(self.out) is not None else "")
            return (f"output_dir {self.out} holds an earlier run ({', '.join(present)}): "
                    f"{how}start over with overwrite=true, or choose another output_dir")
        inputs = [Path(x.strip()) for x in [cfg.model, *cfg.offline_path.split(",")] if x.strip()]
        inside = [str(i) for i in inputs for n in present
                  if i.exists() and i.resolve().is_relative_to((self.out / n).resolve())]
        if inside:
            return (f"overwrite=true would delete this run's own input ({', '.join(inside)} "
                    f"is inside {self.out}): copy it elsewhere or choose another output_dir")
        for n in present:
            p = self.out / n
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if present != ["config.yaml"]:
            self.note(f"overwrite=true: replaced the earlier run in {self.out} ({', '.join(present)})")
        return None

    def _on_policy_terms_in_use(self) -> bool:
        """Whether fresh groups of this run would get on-policy-only loss terms (§4.2)."""
        cfg = self.cfg
        return (losses.loss_spec(cfg.loss).has_on_policy_terms(cfg.loss_options)
                and samples_from_pi(cfg.temperature, cfg.top_p, cfg.top_k)
                and "fresh" in parse_source(cfg.source))

    def _check_sampler(self) -> list[str]:
        """Whether the sampler's groups count as draws from pi (:mod:`agro.sampler_check`): it is
        measured against the learner on a few held-out prompts and the run's rule
        (``sampler_on_policy``) applied, always for generator=vllm, and for agro's own samplers
        when the loss has on-policy-only terms that fresh groups would get (in bf16 its rounding
        is not the learner's). With several processes they count only if every rank's sampler
        passes. The random state is left as it was (CPU and the model's accelerator), so the
        run's own samples do not depend on this check. A resumed run keeps its decision."""
        cfg = self.cfg
        previous = self._resumed_sampler_check
        on_policy_terms = self._on_policy_terms_in_use()
        if cfg.generator != "vllm" and not on_policy_terms:
            # nothing depends on it: not measured; a decision made earlier in the run is kept,
            # else the checkpoint says none was made (so a resume that needs one measures)
            self.sampler_record = previous or {"checked": False}
            return []
        if cfg.generator != "vllm" and self.ckpt_path is not None and previous is None \
                and cfg.sampler_on_policy == "auto":
            # a checkpoint made before agro's own samplers were checked (2026-12-02): the run
            # goes on as it started, its groups counted as draws from pi
            line = ("resumed from a checkpoint that records no sampler check (made before agro "
                    "checked its own samplers): its groups keep counting as draws from pi")
            self.note(line)
            return [line]
        check = getattr(self.generator, "check_against", None)
        if self.async_source is not None:
            check = "actors"       # the actors sample: each checks its own sampler
        if check is None:
            return []
        prompts = [p for p in (self.collector.encode(ex) for ex in self.task.eval_examples(8))
                   if len(p) <= cfg.max_prompt_tokens]
        if check == "actors":
            report = self.async_source.check_sampler(prompts, cfg.sampler_on_policy,
                                                     cfg.sampler_mismatch_tol, previous,
                                                     self.version)
            lines = [f"rollout actors: {x}" for x in report["lines"]]
            self.sampler_record, exact = report["record"], report.get("exact", True)
        else:
            with keep_random_state(self.device):
                lines = check(self.learner, cfg.precision, prompts, cfg.group_size,
                              sampling_params(cfg), cfg.sampler_on_policy,
                              cfg.sampler_mismatch_tol, previous=previous)
            exact = bool(getattr(self.generator, "exact", True))
            if self.dist.world > 1:       # every rank samples: all must pass, or none counts
                passed = self.dist.sum_int(int(exact))
                if exact and passed < self.dist.world:
                    lines.append(f"{self.dist.world - passed} of {self.dist.world} processes' "
                                 "samplers did not pass: no process's groups count as draws "
                                 "from pi")
                exact = self.generator.exact = passed == self.dist.world
            record = getattr(self.generator, "record", None)
            self.sampler_record = dict(record, exact=exact) if isinstance(record, dict) else record
        if exact is False and on_policy_terms:
            lines.append(f"warning: loss {cfg.loss} has on-policy-only terms and they are off for "
                         "every fresh group of this run (its sampler's numerics are not the "
                         "learner's; precision=fp32 passes the check on the default model; or "
                         "sampler_on_policy=yes)")
        k = cfg.vllm_sync_every
        if k > 1 and any(e and e % k for e in (cfg.save_every, cfg.eval_every)):
            lines.append(f"note: weights are also pushed at every checkpoint and evaluation, so "
                         f"save_every={cfg.save_every} / eval_every={cfg.eval_every} (not multiples "
                         f"of vllm_sync_every={k}) shorten some lags")
        for line in lines:
            self.note(line)
        return lines

    def note(self, msg: str) -> None:
        if self.dist.is_main:
            print(f"[agro] {msg}", flush=True)

    # ------------------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        cfg = self.cfg
        record = self.sampler_record
        if self.logger and record and "exact" in record and self.ckpt_path is None:
            self.logger.log_event("sampler_check", step=0, generator=cfg.generator, **record)
        if self.step == 0 and cfg.eval_prompts > 0 and cfg.eval_before and self.before is None:
            self.before = self.run_eval("before")
            if self.logger:
                self.logger.log_event("eval", when="before", step=0, **self.before)
        progress = TrainProgress(cfg.steps, enabled=cfg.progress and self.dist.is_main,
                                 start_step=self.step)
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                groups = self.mixer.take(self.local_prompts, self.version)
                t1 = time.perf_counter()
                version = self.version          # the version these groups are learned at
                metrics = self.learn(groups)
                t2 = time.perf_counter()
                self.step += 1
                metrics.update(self.step_metrics(groups, version, t0, t1, t2))
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    metrics.update({f"eval_{k}": v for k, v in self.run_eval("during").items()})
                if self.logger:
                    self.logger.log(self.step, metrics)
                progress.update(self.step, metrics)
                if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.steps:
                    self.save()
        except BaseException:   # TrainingAborted, a crash, ^C: the checkpoint stays; free the engine
            self.finish_saving(raise_errors=False)
            self.close_generator()
            raise
        finally:
            progress.close()
        try:
            try:
                after = self.run_eval("after") if cfg.eval_prompts > 0 else None  # overlaps the last save
            except BaseException:
                self.finish_saving(raise_errors=False)
                raise
            self.finish_saving()
            self.report()
            final_dir = self.export_final() if cfg.save_final else None
            plot_path = None
            if self.logger:
                if after:
                    self.logger.log_event("eval", when="after", step=self.step, **after)
                self.logger.close()
                plot_path = self.make_plot()
        finally:   # a failed last save or evaluation still frees the grader and the engine
            if self._own_grader:
                self.grader.close()
            self.close_generator()
        return TrainResult(self.out, self.step, self.before, after, final_dir, plot_path)

    def learn(self, groups: list[Group]) -> dict:
        """One optimizer step on whole groups: micro-batches, accumulation, all-reduce, clip, step.

        Every sample of the global batch weighs 1 / (global sample count), whichever process holds
        it, and gradients are summed over processes: N processes equal one process on the union
        of their groups, also when a process has fewer groups than the others, or none (it still
        joins the all-reduce). Logged metrics are sample-weighted means over the global batch, so
        a one-micro-batch step logs exactly what ``compute_loss`` returned.
        """
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        if self.mixed:
            self.mixed.work.zero_grad(set_to_none=True)
        local_b = sum(g.n for g in groups)
        global_b = self.dist.sum_int(local_b)
        sums: dict[str, float] = {}
        self.learn_flops = 0.0
        for mb in split_groups(groups, cfg.micro_batch_groups, cfg.micro_batch_tokens):
            batch = collate(mb, self.tok.pad_token_id, self.version).to(self.device)
            kl = self.needs_token_kl    # the full logits: the head on every position, twice
            self.learn_flops += batch_flops(self.flops, batch, backward=True, head_all=kl) + \
                (batch_flops(self.flops, batch, backward=False, head_all=True) if kl else 0.0)
            loss, m = self.micro_batch_loss(batch)
            (loss * (batch.num_samples / global_b)).backward()
            if self.mixed and self.accum_fp32:   # each micro-batch's bf16 grads -> fp32
                self.mixed.accumulate_grads()
            maybe_crash("backward")
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v * batch.num_samples
        if self.mixed:      # the step's bf16 gradients -> the fp32 masters' .grad, once
            self.mixed.accumulate_grads()
        self.dist.all_reduce_sum_grads_(self.trainable)
        metrics = self.dist.weighted_mean(sums, local_b)
        if global_b == 0:   # nothing to learn from on any process (e.g. every prompt too long)
            self.optimizer.zero_grad(set_to_none=True)
            self.counters.empty_steps += 1
            self.note(f"step {self.step + 1}: no group to learn from on any process; no update")
            return {"skipped_steps": float(self.total_skipped_steps), "grad_norm": float("nan")}
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))
        if math.isfinite(grad_norm) and math.isfinite(metrics.get("loss", float("nan"))):
            self.checkpoint_written()   # a background save reads the weights the step changes
            self.optimizer.step()
            # the fp32 gradients are spent: free them now, not at the next step's start, so
            # sampling, evaluation and checkpoints run without them (~0.5 GB on SmolLM2-135M)
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.version += 1
            if self.mixed:      # the one cast per step: masters -> bf16 working weights
                self.mixed.refresh()
            self.generator.sync_weights(self.learner)
            self.consecutive_skips = 0
        else:
            self.skip_step(grad_norm, metrics.get("loss"))
        metrics["grad_norm"] = grad_norm if math.isfinite(grad_norm) else float("nan")
        metrics["skipped_steps"] = float(self.total_skipped_steps)
        return metrics

    def micro_batch_loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The registered loss on one micro-batch (on the policy's device). The registry says
        which inputs the loss takes (``on_policy`` flags, the full-vocabulary ``token_kl``)."""
        opts = dict(self.cfg.loss_options)
        if self.loss.accepts_on_policy:
            opts["on_policy"] = batch.on_policy
        if self.loss.needs_behavior(opts):
            if batch.behavior_logprobs is None:
                raise ValueError(f"loss {self.cfg.loss} with {opts} needs the behaviour log-probs "
                                 "the sampler recorded, and some groups of this step have none "
                                 "(e.g. an offline file written without them)")
            opts["behavior_logprobs"] = batch.behavior_logprobs
        if self.needs_token_kl:
            lp, logits = batch_logprobs(self.learner, batch, self.cfg.precision, with_logits=True)
            with torch.no_grad():
                ref_logits = self.reference.logits_slice(
                    batch.input_ids, batch.attention_mask, batch.completion_ids,
                    batch.prompt_len, batch.group_size)
            opts["token_kl"] = token_kl(logits, ref_logits)
            del logits, ref_logits
        else:
            lp = batch_logprobs(self.learner, batch, self.cfg.precision)
        return losses.compute_loss(self.cfg.loss, lp, batch.ref_logprobs, batch.completion_mask,
                                   batch.rewards, batch.group_size, self.cfg.beta, **opts)

    def skip_step(self, grad_norm: float, loss) -> None:
        """A non-finite loss or gradient: weights and optimizer state stay untouched; after
        ``max_consecutive_skips`` in a row, checkpoint the last good state and stop."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        self.consecutive_skips += 1
        self.total_skipped_steps += 1
        self.note(f"step {self.step + 1}: non-finite loss or gradient; optimizer step skipped "
                  f"({self.consecutive_skips} in a row)")
        if self.logger:
            self.logger.log_event("skip_step", step=self.step + 1, grad_norm=str(grad_norm),
                                  loss=str(loss))
        if self.consecutive_skips >= cfg.max_consecutive_skips:
            self.save()
            self.checkpoint_written()
            raise TrainingAborted(
                f"{self.consecutive_skips} consecutive non-finite steps (max_consecutive_skips="
                f"{cfg.max_consecutive_skips}); stopped. The last good state is checkpointed "
                f"in {self.out / 'checkpoints'}; lower lr or check the data.")

    def step_metrics(self, groups: list[Group], version: int, t0: float, t1: float,
                     t2: float) -> dict:
        """Per-step data, timing and counter metrics, combined over processes. ``version`` is the
        policy version the groups were learned at, so staleness is never negative (a skipped step
        does not advance the version)."""
        st: CollectStats = self.collector.pop_stats()
        for k in COUNTERS:
            self.counters.collect[k] += getattr(st, k)
        n_samples = sum(g.n for g in groups)
        tokens = sum(len(c) for g in groups for c in g.completion_ids)
        correct = [c for g in groups for c in (g.correct if g.correct is not None else g.rewards)]
        dated = [version - g.policy_version for g in groups if g.policy_version >= 0]
        hist: dict[int, int] = {}   # staleness histogram of this step's groups
        for d in dated:
            hist[d] = hist.get(d, 0) + 1
        by_source: dict[str, int] = {}
        for g in groups:
            by_source[g.source] = by_source.get(g.source, 0) + 1
        sums = {   # summed over processes, then divided by the global count they refer to
            "correct": float(sum(correct)), "samples": float(n_samples), "tokens": float(tokens),
            "groups": float(len(groups)), "dated_groups": float(len(dated)),
            "staleness_sum": float(sum(dated)),
            **{f"{s}_groups": float(c) for s, c in by_source.items()},
            **{f"staleness_{d}_groups": float(c) for d, c in hist.items()},
            **{k: float(getattr(st, k)) for k in COUNTERS},
            "gen_seconds": st.gen_seconds, "grade_seconds": st.grade_seconds,
            "ref_seconds": st.ref_seconds, "decode_steps": float(st.decode_steps),
            "gen_tokens": float(st.completion_tokens),
            "ref_flops": st.ref_flops, "learn_flops": getattr(self, "learn_flops", 0.0),
        }
        tot = self.dist.sum_dict(sums)
        g_all = max(1.0, tot["groups"])
        gen_div = 1 if self.async_source is not None else self.dist.world
        m = {
            "accuracy": tot["correct"] / max(1.0, tot["samples"]),
            "completion_len_mean": tot["tokens"] / max(1.0, tot["samples"]),
            "staleness_mean": tot["staleness_sum"] / max(1.0, tot["dated_groups"]),
            "groups": tot["groups"],
            "step_seconds": t2 - t0,
            "collect_seconds": t1 - t0,
            "learn_seconds": t2 - t1,
            # per process (each ran its share at the same time); async: rank 0 alone reports the
            # actors' summed seconds
            "gen_seconds": tot["gen_seconds"] / gen_div,
            "grade_seconds": tot["grade_seconds"] / gen_div,
            "ref_seconds": tot["ref_seconds"] / gen_div,
            "tokens_per_second": tot["tokens"] / max(1e-9, t2 - t0),
            "lr": self.scheduler.get_last_lr()[0],
            **{k: tot[k] for k in COUNTERS},
        }
        m.update({k: v for k, v in tot.items() if k.startswith("staleness_") and k.endswith("_groups")})
        if self.async_source is not None:   # the histogram's every bar, also the empty ones
            for d in range(self.cfg.max_staleness + 1):
                m.setdefault(f"staleness_{d}_groups", 0.0)
            m.update(self.async_metrics(tot["tokens"]))
        for s in ("fresh", "replay", "offline", "stale"):
            m[f"{s}_fraction"] = tot.get(f"{s}_groups", 0.0) / g_all
        w = self.dist.world   # per-process rates: each process runs its share in the same seconds
        m.update(phase_rates(learn_flops=tot["learn_flops"] / w, learn_seconds=t2 - t1,
                             ref_flops=tot["ref_flops"] / gen_div, ref_seconds=m["ref_seconds"],
                             gen_tokens=int(tot["gen_tokens"] / gen_div),
                             decode_steps=int(tot["decode_steps"] / gen_div),
                             gen_seconds=m["gen_seconds"],
                             weight_bytes=sum(p.numel() * p.element_size()
                                              for p in self.generator.model.parameters()),
                             peak=self.peak))
        return m

    def async_metrics(self, tokens: float) -> dict:
        """async_generation: how the two sides spent the time since the previous step's metrics
        (``wall``). Actor work is counted when its groups arrive, so one step's actor figures are
        noisy (clamped to [0, 1]); over a run, the summed busy seconds against the summed wall
        time are exact. ``async_actor_tokens_per_second``: completion tokens the actors produced
        per wall second (all actors); ``async_learner_tokens_per_second``: tokens the learner
        learned per wall second."""
        st = self.async_source.pop_stats()
        wall = max(1e-9, st.wall_seconds)
        actors = max(1, self.cfg.async_actors)
        return {
            "async_learner_idle_fraction": min(1.0, st.wait_seconds / wall),
            "async_actor_idle_fraction": min(1.0, max(0.0, 1.0 - st.actor_busy_seconds
                                                      / (actors * wall))),
            "async_actor_tokens_per_second": st.actor_tokens / wall,
            "async_learner_tokens_per_second": tokens / wall,
            "async_actor_busy_seconds": st.actor_busy_seconds,
            "async_wall_seconds": st.wall_seconds,
            "async_checkpoint_wait_seconds": st.checkpoint_wait_seconds,
            "async_push_seconds": st.push_seconds,
            "async_actor_restarts": float(st.restarts),
            "async_requests_resent": float(st.resent),
        }

    def report(self) -> None:
        """End-of-run report: bad data rows skipped (per file and reason) and the run's counters."""
        for rep in self.task.reports:
            if rep.skipped:
                self.note(f"skipped bad rows: {rep.summary()}")
        c = self.counters
        if c.skipped_rows:
            total = sum(c.skipped_rows.values())
            detail = ", ".join(f"{k}={v}" for k, v in sorted(c.skipped_rows.items()))
            self.note(f"skipped {total} bad offline rows ({detail})")
        collect = {k: int(v) for k, v in self.dist.sum_dict(c.collect).items()}  # all processes
        nonzero = {k: v for k, v in collect.items() if v}
        if nonzero or c.empty_steps or self.total_skipped_steps:
            parts = [f"{k}={v}" for k, v in nonzero.items()]
            parts += [f"steps_without_groups={c.empty_steps}"] if c.empty_steps else []
            parts += [f"non_finite_steps_skipped={self.total_skipped_steps}"] \
                if self.total_skipped_steps else []
            self.note("counted over the run: " + ", ".join(parts))
        if self.logger:
            self.logger.log_event("counters", **collect, empty_steps=c.empty_steps,
                                  skipped_steps=self.total_skipped_steps,
                                  **{f"skipped_rows:{k}": v for k, v in c.skipped_rows.items()})

    # ------------------------------------------------------------------------------ eval
    def run_eval(self, when: str) -> dict:
        """Held-out accuracy (each process evaluates its share; sample-weighted over processes)."""
        cfg = self.cfg
        examples = self.task.eval_examples(cfg.eval_prompts)[self.dist.rank::self.dist.world]
        self.note(f"held-out evaluation ({when}): {cfg.eval_prompts} prompts x {cfg.eval_samples} "
                  "samples at temperature 1")
        force_sync = getattr(self.generator, "force_sync", None)
        if force_sync is not None:   # a sampler that may lag (vllm_sync_every > 1): current weights
            force_sync(self.learner, only_if_behind=True)
        # its own RNG stream, the same at every evaluation (agro.evaluation.eval_seed): training's
        # samples do not depend on whether, how often or in how many calls the run evaluates
        with eval_random_stream(self.device, cfg.seed, self.dist.rank):
            res = evaluate(tokenizer=self.tok, generator=self.generator, grader=self.grader,
                           examples=examples, template=cfg.prompt_template,
                           samples=cfg.eval_samples, greedy=False,
                           max_new_tokens=cfg.max_new_tokens, reference=self.reference,
                           batch_size=cfg.eval_batch_size)
        counts = {k: float(v) for k, v in res.items()
                  if k in ("eval_prompts", "eval_prompts_too_long", "sampled_samples",
                           "sampled_grade_timeouts", "eval_generate_calls")}
        w = counts.get("sampled_samples", 0.0)
        rates = {k: float(v) * w for k, v in res.items() if k not in counts and k != "eval_seconds"}
        res = {**self.dist.weighted_mean(rates, w), **self.dist.sum_dict(counts),
               "eval_seconds": max(self.dist.all_gather(float(res["eval_seconds"])))}
        self.note(f"held-out sampled accuracy ({when}): {res['sampled_accuracy']:.3f} "
                  f"(KL(pi||pi_ref) ~ {res.get('kl_pi_ref', 0.0):.4f}, "
                  f"{res['eval_seconds']:.0f} s, {res['eval_generate_calls']:.0f} sampling "
                  f"call{'s' if res['eval_generate_calls'] != 1 else ''}"
                  f"{f' over {self.dist.world} processes' if self.dist.world > 1 else ''})")
        return res

    # ------------------------------------------------------------------------------ state
    def state(self) -> dict:
        return {
            "step": self.step,
            "version": self.version,
            "consecutive_skips": self.consecutive_skips,
            "total_skipped_steps": self.total_skipped_steps,
            "rng": rng_state(),
            "sampler": self.sampler.state_dict(),
            "mixer": self.mixer.state_dict(),
            "before": self.before,
            "counters": {"collect": dict(self.counters.collect),
                         "empty_steps": self.counters.empty_steps},
            "world": self.dist.world,
            "sampler_check": self.sampler_record,
            "async_generation": bool(self.cfg.async_generation),
        }

    def save(self) -> Path | None:
        # a sampler that lags (vllm_sync_every > 1) gets the current weights at every checkpoint,
        # so a resumed run's engine holds what the uninterrupted run's held
        force_sync = getattr(self.generator, "force_sync", None)
        if force_sync is not None:
            force_sync(self.learner, only_if_behind=True)
        path = None
        if self.dist.world > 1:   # each rank keeps its own sampler/source/RNG state
            st = {"rank_states": self.dist.all_gather(self.state())}
        else:
            st = self.state()
        if self.dist.is_main:
            args = (self.out, self.step, self.policy, self.optimizer, self.scheduler, st,
                    to_dict(self.cfg))
            if self.saver is not None:   # written on its thread; see checkpoint_written()
                path = self.saver.submit(*args, keep=self.cfg.keep_checkpoints)
            else:
                path = save_checkpoint(*args, keep=self.cfg.keep_checkpoints)
        self.dist.barrier()
        return path

    def checkpoint_written(self) -> None:
        """Wait for a checkpoint being written in the background (``save_async``); re-raises its
        error. Called before anything changes what it writes (the optimizer step)."""
        if self.saver is not None:
            self.saver.wait()

    def finish_saving(self, raise_errors: bool = True) -> None:
        """End of :meth:`train`: the last checkpoint is complete and the writer thread gone. With
        ``raise_errors=False`` (already unwinding from another error) a failed write is logged."""
        saver, self.saver = self.saver, None      # later saves (if any) are synchronous
        if saver is None:
            return
        try:
            saver.close()
        except Exception as e:
            if raise_errors:
                raise
            self.note(f"the checkpoint being written when training stopped failed: {e!r}")

    def _resume(self) -> None:
        st = load_checkpoint(self.ckpt_path, self.policy, self.optimizer, self.scheduler)
        if "rank_states" in st:
            if len(st["rank_states"]) != self.dist.world:
                raise ValueError(f"checkpoint was written by {len(st['rank_states'])} processes; "
                                 f"resume with the same number (now {self.dist.world})")
            st = st["rank_states"][self.dist.rank]
        if bool(st.get("async_generation", False)) != bool(self.cfg.async_generation):
            raise ValueError(f"--resume: the checkpoint was written with async_generation="
                             f"{str(bool(st.get('async_generation', False))).lower()}; resume "
                             "with the setting the run began with")
        self.step = int(st["step"])
        self.version = int(st["version"])
        self.consecutive_skips = int(st["consecutive_skips"])
        self.total_skipped_steps = int(st["total_skipped_steps"])
        self.sampler.load_state_dict(st["sampler"])
        self.mixer.load_state_dict(st["mixer"])
        self.before = st.get("before")
        saved = st.get("counters") or {}
        self.counters.collect.update(saved.get("collect") or {})
        self.counters.empty_steps = int(saved.get("empty_steps", 0))
        set_rng_state(st["rng"])
        if self.mixed:
            self.mixed.refresh()
        getattr(self.generator, "force_sync", self.generator.sync_weights)(self.learner)
        self._resumed_sampler_check = st.get("sampler_check")
        self.note(f"resumed from {self.ckpt_path} at step {self.step}")

    def export_final(self) -> Path | None:
        if not self.dist.is_main:
            return None
        final = self.out / "final"
        save_for_transformers(self.policy, self.tok, final)
        return final

    def make_plot(self) -> Path | None:
        if not (self.cfg.plot and self.dist.is_main):
            return None
        try:
            from .plotting import plot_runs

            return plot_runs([self.out], self.out / "curves.png")
        except Exception as e:  # a plot must never lose a finished run
            self.note(f"plot failed: {e}")
            return None


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    return Trainer(cfg, resume=resume).train()
