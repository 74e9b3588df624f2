"""One optimizer step's shared parts: what a method is given (``StepContext``), what it returns
(``StepResult``), and what every method does alike (the reduction's weights, the micro-batch loop,
the student's log-probs of given tokens). The methods themselves live in ``train/methods/``."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.modeling.batching import PairBatch, SideBatch, aligned_hidden, build_pair_batch
from rcsd_cli.modeling.distributed import reduce_sum
from rcsd_cli.modeling.generation import generate
from rcsd_cli.modeling.logprobs import chunked_token_logprobs
from rcsd_cli.train.phases import no_clock

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rcsd_cli.backends import Backend
    from rcsd_cli.data.rows import Rubric
    from rcsd_cli.modeling.generation import Generation
    from rcsd_cli.train.chunked_loss import TeacherTopK

Number = float | torch.Tensor  # a 0-d device tensor until the step's one read (``StepResult.read``)
Generate = Callable[[list[list[int]], Any, list[int]], list["Generation"]]  # (prompts, generation config, seeds)


@dataclass(kw_only=True)
class StepResult:
    """One process's sums for a step. Sums computed on the device stay there while the step runs: a method
    never asks the device for a value (no host sync inside the step); ``read`` fetches them all at once."""

    loss_sum: Number
    tokens: float  # completion tokens of the whole step, all processes (a count; read() makes it an int)
    kl_sum: Number | None = None
    agree_sum: Number | None = None
    reward: float | None = None
    rollout_tokens: int = 0
    reward_count: int = 0  # rollouts the mean reward is over (to combine processes)
    objective: Number | None = None  # this process's share of the step's loss under --loss-reduction
    judge_unjudged: int | None = None  # --reward judge: criteria left unjudged this step
    reward_unscored: int | None = None  # --reward judge: rollouts given their group's mean
    health: dict[str, Number] = field(default_factory=dict)  # sums: entropies, clip share, n-gram and length counts

    def read(self, device: torch.device, combine: Callable[[torch.Tensor], Any] | None = None) -> StepResult:
        """Every figure as a Python number, summed over processes by ``combine`` (an in-place all-reduce of a
        float64 tensor; ``tokens`` is already global): one tensor, one collective, one host read."""
        names = ["loss_sum", "kl_sum", "agree_sum", "objective", "rollout_tokens", "reward_count",
                 "judge_unjudged", "reward_unscored"]
        values = [getattr(self, n) for n in names]
        health = sorted(self.health)
        reward_total = None if self.reward is None else self.reward * self.reward_count
        values += [self.health[k] for k in health] + [reward_total]
        present = [v is not None for v in values]
        flat = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                            for v in values if v is not None])
        if combine is not None:
            combine(flat)
        it = iter(flat.tolist())
        got = [next(it) if here else None for here in present]
        out: dict[str, Any] = dict(zip(names, got[: len(names)], strict=True))
        reward_total, count = got[-1], out["reward_count"]
        for n in ("rollout_tokens", "reward_count", "judge_unjudged", "reward_unscored"):
            out[n] = None if out[n] is None else int(round(out[n]))
        reward = self.reward if combine is None else reward_total / count if reward_total is not None and count \
            else None
        return StepResult(tokens=int(self.tokens), reward=reward,
                          health={k: v for k, v in zip(health, got[len(names): -1], strict=True) if v is not None},
                          **out)


@dataclass
class StepContext:
    """What a method's step is given: the models, the run's settings, and the run's engines and clocks."""

    student: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    teacher_hidden: Callable[[SideBatch], torch.Tensor]  # no-grad hidden states of the teacher
    teacher_head: torch.nn.Module
    cfg: TrainConfig
    step: int
    teacher_generate: Generate | None = None  # (prompts, generation config, seeds) -> generations, no grad
    rank: int = 0
    student_generate: Generate | None = None  # as teacher_generate, from the current student (default: HF)
    clock: Callable[[str], AbstractContextManager] = no_clock  # phases.PhaseClock: with ctx.clock("rollout"): ...
    compute: Callable[[], AbstractContextManager] = nullcontext  # forward passes run in it, backward outside it
    judge: Backend | None = None  # --reward judge: the judge backend, opened once per run
    controls: dict[str, Rubric] | None = None  # --teacher-contrast: item id -> the row of its control context
    # --teacher-base-url: (teacher prompts, completions) -> a future of the server's top-k (served_teacher.py)
    teacher_topk: Callable[[list[list[int]], list[list[int]]], Future[TeacherTopK]] | None = None

    def student_samples(self, prompts: list[list[int]], gen_cfg, seeds: list[int]) -> list[Generation]:
        if self.student_generate is not None:
            return self.student_generate(prompts, gen_cfg, seeds)
        return generate(self.student, self.tokenizer, prompts, gen_cfg, 0, seeds=seeds)

    def global_sum(self, value: float) -> float:
        """Sum over data-parallel processes (identity in one process)."""
        return reduce_sum(value)


def reduction_weights(ctx: StepContext, counts: list[int]) -> list[float]:
    """Per-sequence weight of each token's loss, so one step's loss is exact whatever the batching.

    ``token``: every token weighs 1 / (completion tokens of the step, all processes).
    ``sequence`` (the authors'): a sequence of n tokens weighs each by 1 / (n * sequences of the
    step, all processes), i.e. the mean over sequences of per-sequence token means. Sequences
    with no token in the loss count for neither.
    """
    if ctx.cfg.loss_reduction == "token":
        total = max(ctx.global_sum(sum(counts)), 1)
        return [1.0 / total] * len(counts)
    sequences = max(ctx.global_sum(sum(1 for n in counts if n > 0)), 1)
    return [1.0 / (n * sequences) if n > 0 else 0.0 for n in counts]


MicroStep = Callable[[slice], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def accumulate(ctx: StepContext, n: int, micro_step: MicroStep) -> tuple[Number, dict[str, Number]]:
    """Every method's micro-batch loop: ``micro_step(rows)`` returns (weighted loss, {name: sum}).

    Each micro-batch's weighted loss is backpropagated as soon as it exists (gradients add up in
    ``.grad``; the weights make the sum the step's loss); returns the objective and the summed stats, as
    device tensors (read once per step, ``StepResult.read``).
    """
    objective: Number = 0.0
    sums: dict[str, Number] = {}
    for j in range(0, n, ctx.cfg.micro_batch_size):
        weighted, stats = micro_step(slice(j, j + ctx.cfg.micro_batch_size))
        with ctx.clock("student"):
            weighted.backward()
        objective = objective + weighted.detach()
        for name, value in stats.items():
            sums[name] = sums.get(name, 0.0) + value.detach()
    return objective, sums


def sequence_logprobs(ctx: StepContext, prompts, continuations, sl: slice,
                      health: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, PairBatch]:
    """The student's log-prob of each continuation token after its prompt, for micro-batch ``sl``.

    Returns (log-probs [B, T], mask [B, T] on the student's device, the pair batch); call it under
    ``ctx.compute()`` so the forward runs in the run's precision. ``health`` receives the token sum of
    the student's entropy at those positions.
    """
    pb = build_pair_batch(prompts[sl], prompts[sl], continuations[sl], ctx.tokenizer.pad_token_id)
    hidden = aligned_hidden(ctx.student, pb.student)
    dev = hidden.device
    entropies: dict = {}
    logp = chunked_token_logprobs(hidden, ctx.student.get_output_embeddings(), pb.targets.to(dev),
                                  ctx.cfg.chunk_size, entropies=entropies if health is not None else None)
    mask = pb.mask.to(dev).float()
    if health is not None:
        ent = torch.cat([entropies[k] for k in sorted(entropies)], dim=1)
        health["student_entropy"] = health.get("student_entropy", 0.0) + (ent * mask).sum().detach()
    return logp, mask, pb
