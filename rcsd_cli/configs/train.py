"""``rcsd train``'s settings and its own option groups (teacher, reason-first, GRPO, LoRA, rollouts,
distribution, dry run, monitor); stored in every checkpoint and in metrics.parquet.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import model_validator

from rcsd_cli.configs.groups import (
    MODEL_HELP,
    PROMPT_STYLE_HELP,
    ROLLOUT_MEMORY_SHARE,
    AttnImplementation,
    BackendConfig,
    ConfigModel,
    ContrastTeacherConfig,
    GenerationConfig,
    LossConfig,
    Precision,
    PromptStyle,
    SaveDtype,
    VllmConfig,
    attn_option,
    generation_defaults,
)
from rcsd_cli.data.options import nested, opt, refuse_changed
from rcsd_cli.data.rows import MetricsRow
from rcsd_cli.models import DEFAULT_MODEL


class TrainTeacherConfig(ContrastTeacherConfig):
    """The training teacher: which weights, what it sees, and the authors' rubric ablations."""

    kind: Literal["frozen", "live", "ema"] = opt("frozen", panel="Teacher", flag="--teacher", help="frozen: "
                                                 "initial weights; live: current weights; ema: moving average of "
                                                 "the student.")
    ema_decay: float = opt(0.99, gt=0.0, lt=1.0, panel="Teacher", flag="--ema-decay",
                           help="ema teacher: decay per step.")
    context: Literal["rubric", "rubric+reference", "reason-first"] = opt(  # type: ignore[assignment]  # widened
        "rubric+reference", panel="Teacher", flag="--teacher-context", help="What the rcsd teacher sees besides "
        "the question. reason-first: the teacher first writes an analysis of the reference and rubric (its own "
        "sampled turn), then a transition text, then the student's rollout (the authors' published run).")
    rubric_ablation: Literal["none", "generic", "shuffled", "noisy", "reduced"] | None = opt(
        None, panel="Teacher", flag="--rubric-ablation", help="The authors' ablations: none (no rubric, reference "
        "only), generic (the authors' six-criterion rubric for every item), shuffled (another item's rubric), noisy "
        "(criteria reordered, 30% of weights negated), reduced (a random half of the criteria). Rubrics from "
        "another generator: --rubrics from that file.")

    base_url: str | None = opt(
        None, panel="Teacher", flag="--teacher-base-url", help="Take the frozen teacher's top-k log-probs from an "
        "OpenAI-compatible server with prompt log-probs (vllm serve --max-logprobs K, or rcsd serve) at this URL, "
        "e.g. http://teacher:8000/v1, instead of a teacher copy in this process (reason-first: the server samples the "
        "analyses too). The server's model must share the student's tokenizer; rcsd builds the teacher's prompt and "
        "sends token ids.")
    served_model: str | None = opt(None, panel="Teacher", flag="--teacher-served-model",
                                   help="--teacher-base-url: the model name on the server (default --model).")
    api_key_env: str = opt("OPENAI_API_KEY", panel="Teacher", flag="--teacher-api-key-env",
                           help="--teacher-base-url: environment variable holding the server's API key (never "
                           "logged).")
    max_retries: int = opt(5, ge=0, panel="Teacher", flag="--teacher-max-retries", help="--teacher-base-url: retries "
                           "per request (backoff, Retry-After honoured); a request that still fails stops the run in "
                           "one line, and --resume continues from its last checkpoint (--save-every).")

    @model_validator(mode="after")
    def _no_silently_ignored_options(self) -> TrainTeacherConfig:
        if self.kind != "ema":
            refuse_changed(self, ("ema_decay",), f"with --teacher {self.kind}")
        if not self.base_url:
            refuse_changed(self, ("served_model", "api_key_env", "max_retries"), "without --teacher-base-url")
        elif self.kind != "frozen":
            raise ValueError(f"--teacher-base-url serves a frozen teacher: the server's weights do not follow the "
                             f"student (--teacher {self.kind})")
        elif self.contrast != "none":
            raise ValueError("--teacher-base-url is not available with --teacher-contrast (the contrast is taken "
                             "over both contexts' whole logits, a server gives their top-k)")
        if self.contrast != "none" and self.context == "reason-first":
            raise ValueError("--teacher-contrast is not available with --teacher-context reason-first (the control "
                             "would need analyses of its own)")
        return self

    def server_config(self) -> BackendConfig:
        """``--teacher-base-url``'s client: retries, timeouts and failures as every served stage has them."""
        return BackendConfig(kind="openai", base_url=self.base_url, served_model=self.served_model,
                             api_key_env=self.api_key_env, max_retries=self.max_retries)


class ReasonFirstConfig(ConfigModel):
    """``--teacher-context reason-first``: how the teacher's own analysis turn is sampled."""

    by: Literal["teacher", "student"] = opt(
        "teacher", panel="Teacher", flag="--analysis-by", help="reason-first: who writes the analysis. teacher = "
        "the frozen teacher; student = the current student (what the authors' vLLM path did).")
    temperature: float = opt(1.2, ge=0.0, panel="Teacher", flag="--analysis-temperature",
                             help="reason-first: analysis temperature.")
    top_p: float = opt(0.95, gt=0.0, le=1.0, panel="Teacher", flag="--analysis-top-p",
                       help="reason-first: analysis top-p.")
    top_k: int = opt(20, ge=0, panel="Teacher", flag="--analysis-top-k", help="reason-first: analysis top-k (0 = off).")
    max_new_tokens: int = opt(4096, ge=1, panel="Teacher", flag="--analysis-max-new-tokens",
                              help="reason-first: analysis length limit.")


class GRPOConfig(ConfigModel):
    """``--method grpo``: group size, reward and the surrogate's clip and KL."""

    group_size: int = opt(4, ge=1, panel="Optimiser", flag="--group-size", help="GRPO: rollouts per prompt.")
    reward: Literal["rubric", "correct", "judge"] = opt(
        "rubric", panel="Optimiser", flag="--reward", help="GRPO reward: rubric (the rubric's machine checks), "
        "correct (answer correctness) or judge (every criterion without a check judged by --judge-model, score = "
        "the weighted share as rcsd score computes it; a rollout with nothing judged gets its group's mean).")
    clip_eps: float = opt(0.2, gt=0.0, panel="Optimiser", flag="--clip-eps", help="GRPO ratio clip.")
    kl_coef: float = opt(0.0, ge=0.0, panel="Optimiser", flag="--kl-coef",
                         help="GRPO: weight of the k3 KL to the frozen initial model.")
    judge_model: str | None = opt(None, panel="Optimiser", flag="--judge-model", help="--reward judge: the judge "
                                  "model (a local model, or the model name on --judge-base-url).")
    judge_backend: Literal["hf", "vllm", "openai"] = opt(
        "hf", panel="Optimiser", flag="--judge-backend", help="--reward judge: hf (in this process), vllm or "
        "openai (an OpenAI-compatible server at --judge-base-url; key from OPENAI_API_KEY).")
    judge_base_url: str | None = opt(None, panel="Optimiser", flag="--judge-base-url", help="--reward judge with "
                                     "--judge-backend openai: the server URL, e.g. http://127.0.0.1:8000/v1")
    judge_retries: int = opt(2, ge=0, panel="Optimiser", flag="--judge-retries", help="--reward judge: retries "
                             "after a malformed judge reply; then the criterion is unjudged (counted per step).")

    @model_validator(mode="after")
    def _judge_settings(self) -> GRPOConfig:
        if self.reward != "judge":
            refuse_changed(self, ("judge_model", "judge_backend", "judge_base_url", "judge_retries"),
                           f"with --reward {self.reward}")
        elif not self.judge_model:
            raise ValueError("--reward judge needs --judge-model")
        elif (self.judge_backend == "openai") != bool(self.judge_base_url):
            raise ValueError("--judge-base-url goes with --judge-backend openai, and openai needs it")
        return self

    def judge_backend_config(self) -> BackendConfig:
        return BackendConfig(kind=self.judge_backend, base_url=self.judge_base_url)


class LoraConfig(ConfigModel):
    """LoRA adapters (peft) instead of full fine-tuning, when ``rank`` > 0."""

    rank: int = opt(0, ge=0, panel="LoRA", flag="--lora-rank", help="0: full fine-tuning; >0: LoRA adapters of "
                    "this rank.")
    alpha: float = opt(32.0, gt=0, panel="LoRA", flag="--lora-alpha", help="LoRA scaling alpha.")
    dropout: float = opt(0.05, ge=0.0, lt=1.0, panel="LoRA", flag="--lora-dropout", help="LoRA dropout.")
    targets: str = opt("q_proj,v_proj", panel="LoRA", flag="--lora-targets", help="Comma-separated module names, "
                       "or all-linear.")
    merge: bool = opt(False, panel="LoRA", flag="--merge-lora", help="Also write merged full weights (to "
                      "OUTPUT/merged).")

    @model_validator(mode="after")
    def _no_silently_ignored_options(self) -> LoraConfig:
        if not self.rank:
            refuse_changed(self, ("alpha", "dropout", "targets", "merge"), "without --lora-rank")
        return self


class RolloutConfig(ConfigModel):
    """Who generates training rollouts (and reason-first analyses): rcsd's own loop, or colocated vLLM."""

    backend: Literal["hf", "vllm"] = opt(
        "hf", panel="Rollouts", flag="--rollout-backend", help="Engine for rollouts and reason-first analyses: hf "
        "(rcsd's decoding loop on the training modules) or vllm (colocated vLLM engine in this process, the "
        "student's weights (with LoRA: its adapter) pushed after every optimizer step; a frozen teacher's analyses "
        "from a second engine (with LoRA: the same engine without the adapter); "
        "needs rcsd[vllm]).")
    vllm: VllmConfig = nested(VllmConfig, hide=("tensor_parallel_size",))

    @model_validator(mode="after")
    def _no_silently_ignored_options(self) -> RolloutConfig:
        if self.backend != "vllm":
            refuse_changed(self.vllm, tuple(VllmConfig.model_fields), "without --rollout-backend vllm")
        refuse_changed(self.vllm, ("tensor_parallel_size",), "in train (one rollout engine per process)")
        return self

    @property
    def memory_share(self) -> float:
        """Share of the GPU all of the run's engines together may reserve."""
        return self.vllm.memory_utilization or ROLLOUT_MEMORY_SHARE


class DistributedConfig(ConfigModel):
    """How a launched run (torchrun, accelerate) spreads the student over processes."""

    sharding: Literal["replicate", "full-shard", "shard-grad-op"] | None = opt(
        None, panel="Distributed", help="Under torchrun/accelerate: replicate (plain data parallel), full-shard "
        "(FSDP2, ZeRO-3-like) or shard-grad-op (ZeRO-2-like). Unset: what an accelerate FSDP config asks for, "
        "else replicate.")
    offload: Literal["none", "full"] = opt(
        "none", panel="Distributed", help="Sharded runs: full keeps parameter shards, gradients and AdamW state in "
        "host memory and steps the optimizer there (FSDP2 CPUOffloadPolicy; DeepSpeed's offload_param + "
        "offload_optimizer); each layer is copied to the GPU for its forward and backward.")


_STOP_RULE = re.compile(r"^\s*([a-z][a-z0-9_]*)\s*([<>])\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
                        r"\s*(\*\s*start)?\s*$")


def parse_stop_rule(text: str) -> tuple[str, str, float, bool]:
    """``"eval_accuracy<0.5*start"`` -> (metric, "<", 0.5, relative to the run's first value)."""
    m = _STOP_RULE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not METRIC<VALUE or METRIC>VALUE (VALUE may be F*start)")
    return m.group(1), m.group(2), float(m.group(3)), bool(m.group(4))


def numeric_metrics() -> list[str]:
    """The metrics.parquet columns --keep-best and --stop-when may name."""
    skip = {"step", "method", "phase_peak_rss_gib"}
    return [name for name in MetricsRow.model_fields if name not in skip]


class DryRunConfig(ConfigModel):
    """The target of ``rcsd train --dry-run``'s simulated step: the world and one accelerator."""

    processes: int | None = opt(None, ge=1, panel="Dry run", flag="--processes", help="Processes to simulate "
                                "(the run's world size). Unset: the launcher's WORLD_SIZE, else 1.")
    device_memory: float | None = opt(None, gt=0, panel="Dry run", flag="--device-memory", help="GiB of the "
                                      "accelerator each process gets (H100: 80; the 8B recipes set it): the step "
                                      "is planned for a CUDA device of that size. Unset: this machine's device.")
    device_tflops: float = opt(989.0, gt=0, panel="Dry run", flag="--device-tflops", help="Dense bf16 TFLOP/s of "
                               "one accelerator (H100 SXM: 989), for the step time the counted FLOPs imply on a GPU "
                               "target.")
    utilisation: float = opt(0.4, gt=0, le=1, panel="Dry run", flag="--utilisation", help="Share of "
                             "--device-tflops the step is assumed to reach.")
    prompt_tokens: int = opt(2048, ge=1, panel="Dry run", flag="--dry-run-prompt-tokens", help="Without --rubrics "
                             "or without the model's tokenizer: the longest prompt on each side, in tokens (the "
                             "authors' 2048-token filter).")


class MonitorConfig(ConfigModel):
    """Held-out evaluation during training, and what to do with it: keep the best weights, stop a collapse."""

    every: int = opt(0, ge=0, panel="Evaluation", flag="--eval-every", help="Evaluate the student on held-out "
                     "items every N steps and before the first (0 = never); results in metrics.parquet (eval_*).")
    bench: str | None = opt(None, panel="Evaluation", flag="--eval-bench", help="The held-out bench (the names "
                            "of rcsd eval --bench); its items must not be training items (checked by id and "
                            "question).")
    limit: int = opt(100, ge=1, panel="Evaluation", flag="--eval-limit", help="Held-out items per evaluation.")
    offset: int = opt(0, ge=0, panel="Evaluation", flag="--eval-offset", help="Skip this many items of the bench's "
                      "seeded shuffle (as rcsd eval --offset), e.g. past the ones gen-rubrics took for training.")
    scoring: Literal["loglik", "generate"] = opt(
        "loglik", panel="Evaluation", flag="--eval-scoring", help="loglik: multiple-choice log-likelihood as rcsd "
        "eval --scoring loglik (eval_accuracy, eval_acc_norm, eval_gold_logprob); generate: greedy answers "
        "(--max-new-tokens) graded as rcsd eval (eval_accuracy, eval_strict_accuracy).")
    keep_best: str | None = opt(None, panel="Evaluation", flag="--keep-best", help="A metrics.parquet column "
                                "(e.g. eval_accuracy; loss and kl count lower as better): the weights at its best "
                                "step are kept in OUTPUT/best and the model card names the step.")
    stop_when: str | None = opt(None, panel="Evaluation", flag="--stop-when", help="Stop the run when a metric "
                                "crosses a line, e.g. 'eval_accuracy<0.5*start' (start: its first value) or "
                                "'student_entropy<0.3'; one line says why, the final weights are written.")

    @model_validator(mode="after")
    def _consistent(self) -> MonitorConfig:
        known = numeric_metrics()
        if self.every and not self.bench:
            raise ValueError("--eval-every needs --eval-bench")
        if self.bench and not self.every:
            raise ValueError("--eval-bench needs --eval-every N")
        for flag, name in (("--keep-best", self.keep_best),
                           ("--stop-when", parse_stop_rule(self.stop_when)[0] if self.stop_when else None)):
            if name and name not in known:
                raise ValueError(f"{flag}: unknown metric {name!r} (metrics.parquet has {', '.join(known)})")
            if name and name.startswith("eval_") and not self.every:
                raise ValueError(f"{flag} {name} needs --eval-every N --eval-bench NAME")
        return self


Reduction = Literal["sequence", "token"]


class TrainConfig(ConfigModel):
    """Settings of one ``rcsd train`` run; stored in every checkpoint and in metrics.parquet."""

    rubrics: str | None = opt(None, panel="Data", help="rubrics.parquet (online training).")
    samples: str | None = opt(None, panel="Data", help="Offline round: samples.parquet to train on (no resampling).")
    scores: str | None = opt(None, panel="Data", help="Offline round: scores.parquet with teacher top-k log-probs.")
    limit: int | None = opt(None, ge=1, panel="Data", help="Use at most N problems.")
    max_teacher_prompt_tokens: int | None = opt(
        None, ge=1, panel="Data", help="Drop items whose teacher prompt is longer than N tokens, counted on the "
        "exact ids the teacher gets (reason-first: the analysis prompt). The authors dropped items over 2048; the "
        "count is printed (--dry-run too) and recorded in metrics.parquet and the model card.")
    seed: int = opt(0, panel="Data", help="Random seed (data order, sampling).")
    prompt_style: PromptStyle = opt("paper", panel="Data", help=PROMPT_STYLE_HELP)
    model: str = opt(DEFAULT_MODEL, panel="Model", help=MODEL_HELP)
    attn_implementation: AttnImplementation = attn_option("Model")
    task: Literal["reasoner", "rubric-generator"] = opt(
        "reasoner", panel="Model", help="rubric-generator: stage I, the student writes rubrics, the teacher also sees "
        "the reference rubric.")
    method: Literal["rcsd", "opsd", "grpo", "sft"] = opt(
        "rcsd", panel="Model", help="rcsd: rubric teacher; opsd: reference-answer teacher; grpo: rubric/correctness "
        "reward; sft: cross-entropy on reference answers.")
    teacher: TrainTeacherConfig = nested(TrainTeacherConfig)
    reason_first: ReasonFirstConfig = nested(ReasonFirstConfig)
    loss: LossConfig = nested(LossConfig)
    loss_reduction: Reduction = opt(
        "sequence", panel="Loss", help="sequence: mean over sequences of each sequence's token mean (the authors'); "
        "token: sum over the step's completion tokens / their number.")
    skip_first_tokens: int = opt(0, ge=0, panel="Loss", help="Leave the first N completion tokens out of the loss.")
    chunk_size: int = opt(128, ge=1, panel="Loss", help="Completion tokens per loss chunk (bounds logits memory).")
    steps: int = opt(10, ge=1, panel="Optimiser", help="Optimizer steps.")
    max_rollout_tokens: int | None = opt(None, ge=1, panel="Optimiser",
                                         help="Stop once this many rollout tokens were used.")
    batch_size: int = opt(4, ge=1, panel="Optimiser", help="Prompts per optimizer step (all processes together).")
    micro_batch_size: int = opt(4, ge=1, panel="Optimiser", help="Sequences per forward/backward pass.")
    gradient_checkpointing: bool = opt(False, panel="Optimiser", help="Recompute the student's decoder layers in "
                                       "backward instead of holding their activations (less memory, more time).")
    precision: Precision | None = opt(
        None, panel="Optimiser", help="fp32; bf16-mixed: fp32 master weights and AdamW state, bf16 compute (HF "
        "Trainer's bf16=True, the authors' DeepSpeed bf16); bf16: weights and AdamW state in bf16 (updates under "
        "half a bf16 ulp vanish: at lr 5e-6 about 99% of weights never move). Unset: bf16-mixed on CUDA, fp32 on CPU.")
    lr: float = opt(5e-6, gt=0, panel="Optimiser", help="Peak learning rate (AdamW).")
    lr_schedule: Literal["constant", "linear", "cosine"] = opt(
        "linear", panel="Optimiser", help="After warm-up: constant, linear decay to 0 at --steps (the Trainer "
        "default the authors used) or cosine.")
    warmup_steps: int = opt(0, ge=0, panel="Optimiser", help="Linear warm-up steps.")
    weight_decay: float = opt(0.0, ge=0.0, panel="Optimiser", help="AdamW weight decay.")
    max_grad_norm: float = opt(1.0, gt=0, panel="Optimiser", help="Gradient clipping norm.")
    grpo: GRPOConfig = nested(GRPOConfig)
    lora: LoraConfig = nested(LoraConfig)
    distributed: DistributedConfig = nested(DistributedConfig)
    save_every: int = opt(0, ge=0, panel="Output", help="Checkpoint every N steps (0 = only the final model).")
    save_total_limit: int | None = opt(None, ge=1, panel="Output", help="Keep only the newest N checkpoints (never "
                                       "the one a run resumed from); unset keeps all.")
    save_dtype: SaveDtype = opt(
        "auto", panel="Output", help="dtype of the final weights (full or merged); auto: the dtype the model's "
        "config declares. Checkpoints always keep the training weights (fp32 master under bf16-mixed).")
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = opt(
        "none", panel="Output", help="Also log every step to TensorBoard (OUTPUT/runs), Weights & Biases or Trackio "
        "(optional extras). metrics.parquet is always written.")
    rollout: RolloutConfig = nested(RolloutConfig)
    monitor: MonitorConfig = nested(MonitorConfig)
    dry_run: DryRunConfig = nested(DryRunConfig)
    generation: GenerationConfig = nested(generation_defaults(temperature=1.2, top_p=0.95, top_k=20),
                                          flags={"enable_thinking": "--student-thinking"})

    @model_validator(mode="after")
    def _no_silently_ignored_options(self) -> TrainConfig:
        def refuse(names, why):
            refuse_changed(self, names, why)

        offline = bool(self.samples or self.scores)
        reason_first = tuple(ReasonFirstConfig.model_fields)
        if self.method != "rcsd" or self.task != "reasoner":
            refuse_changed(self.teacher, ("rubric_ablation", "contrast", "contrast_weight"),
                           f"with --method {self.method} --task {self.task} (RCSD reasoner only)")
        if offline or self.method in ("grpo", "sft"):
            refuse(("max_teacher_prompt_tokens",), "on an offline round or with --method grpo/sft (no teacher "
                   "prompt is built)")
            if not offline:
                refuse_changed(self.teacher, ("base_url",), f"with --method {self.method} (no distillation teacher)")
        if self.teacher.base_url:
            self._loss_on_teacher_topk("--teacher-base-url")
        if offline:
            why = "on an offline round (--samples/--scores: the teacher's log-probs are stored)"
            refuse_changed(self.teacher, tuple(TrainTeacherConfig.model_fields), why)
            refuse_changed(self.reason_first, reason_first, why)
            self._loss_on_teacher_topk("an offline round (--samples/--scores)")
        if self.method != "grpo":
            refuse_changed(self.grpo, tuple(GRPOConfig.model_fields), f"with --method {self.method} (GRPO only)")
        if self.teacher.context != "reason-first":
            refuse_changed(self.reason_first, reason_first, "without --teacher-context reason-first")
        elif self.task == "rubric-generator":
            raise ValueError("--teacher-context reason-first is not available with --task rubric-generator (the "
                             "authors' stage I run used the plain teacher)")
        if offline or self.method == "sft":
            refuse_changed(self.rollout, ("backend",), "on an offline round or with --method sft (nothing is "
                           "generated)")
        return self

    def _loss_on_teacher_topk(self, what: str) -> None:
        """A teacher known by its top-k log-probs only serves a loss on those entries."""
        if self.loss.kind != "topk_kl" or self.loss.tail_bucket:
            raise ValueError(f"{what} knows the teacher's top-k log-probs only: it needs --loss topk_kl without "
                             "--tail-bucket")

