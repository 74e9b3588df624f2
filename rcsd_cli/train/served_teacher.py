"""``--teacher-base-url``: the frozen teacher's top-k log-probs from an OpenAI-compatible server, instead of a
teacher copy in the training process.

rcsd builds the teacher's privileged prompt as for an in-process teacher and sends prompt + the student's
completion as token ids with vLLM's ``prompt_logprobs`` (``OpenAIBackend.topk_logprobs``); the top-k
log-probs at the completion positions are a ``TeacherTopK``, which the chunked loss turns into exactly the
loss the teacher's logits give (``chunked_loss``). With ``--teacher-context reason-first`` the server also
samples the teacher's analyses (``generate``). So the teacher can be another (larger) model sharing the
student's tokenizer, run on GPUs of its own, be shared between runs, or be the frozen base kept out of
training memory.

Each micro-batch's request is sent as soon as a step's rollouts exist (``request`` returns a future), so the
server scores micro-batch j+1 while the student runs forward and backward on micro-batch j. Step t+1's
requests cannot start during step t: on-policy rollouts of step t+1 come from the student step t updates.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from rcsd_cli.backends.openai import OpenAIBackend
from rcsd_cli.configs.groups import GenerationConfig
from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.errors import RcsdError
from rcsd_cli.modeling.generation import Generation
from rcsd_cli.models import load_model_config
from rcsd_cli.train.chunked_loss import TeacherTopK


def placement(cfg: TrainConfig) -> str:
    """Where a run's teacher runs, in words (``--dry-run`` and the run's start say it)."""
    t = cfg.teacher
    if t.base_url:
        return (f"served at {t.base_url} (model {t.served_model or cfg.model}): its top-{cfg.loss.top_k} log-probs "
                "per completion token, no teacher weights in this process")
    if cfg.method in ("grpo", "sft"):
        return f"--method {cfg.method} has no distillation teacher"
    if cfg.samples:
        return f"stored top-k log-probs in {cfg.scores}"
    if cfg.lora.rank and t.kind == "frozen":
        return "in this process: the student's base with its LoRA adapters disabled (no copy)"
    if t.kind == "live":
        return "in this process: the student itself (no copy)"
    return f"in this process: a {t.kind} copy of the weights"


class ServedTeacher:
    """A teacher server's top-k over given completions, as ``TeacherTopK`` tensors of one micro-batch."""

    def __init__(self, cfg: TrainConfig, trust_remote_code: bool = False):
        self.backend = OpenAIBackend(cfg.teacher.server_config(), cfg.model, trust_remote_code)
        self.k = cfg.loss.top_k
        self.vocab_size = load_model_config(cfg.model, trust_remote_code).get_text_config().vocab_size
        self.where = f"--teacher-base-url {cfg.teacher.base_url}"
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rcsd-teacher")

    @classmethod
    def open(cls, cfg: TrainConfig, trust_remote_code: bool = False) -> ServedTeacher:
        """The client, after one small request (before any weights load): the server answers, takes
        prompt_logprobs with k entries, and its ids fit the student's vocabulary; else one RcsdError line."""
        teacher = cls(cfg, trust_remote_code)
        probe = teacher.backend.tokenizer("The teacher server answers.", add_special_tokens=False)["input_ids"]
        teacher.fetch([probe[:-1]], [probe[-1:]])
        return teacher

    def fetch(self, prompts: list[list[int]], completions: list[list[int]]) -> TeacherTopK:
        """The top-k at every completion position, laid out [B, longest completion, k] (zeros past each end)."""
        ids, lps = self.backend.topk_logprobs(prompts, completions, self.k)
        width = max(1, max(len(c) for c in completions))  # as build_pair_batch lays the completions out
        topk = TeacherTopK.from_rows(ids, lps, width, self.k)
        top = int(topk.ids.max())
        if top >= self.vocab_size:
            raise RcsdError(f"{self.where}: the server returned token id {top}, outside the student's vocabulary of "
                            f"{self.vocab_size}: the teacher must share the student's tokenizer")
        return topk

    def generate(self, prompts: list[list[int]], gen_cfg: GenerationConfig, seeds: list[int]) -> list[Generation]:
        """Reason-first: the teacher's analyses, sampled by the server (each item's seed sent with it)."""
        return self.backend.generate(prompts, gen_cfg, 0, seeds=seeds)

    def request(self, prompts: list[list[int]], completions: list[list[int]]) -> Future[TeacherTopK]:
        """``fetch`` in the background: the step collects it when its micro-batch's loss needs it."""
        return self._pool.submit(self.fetch, prompts, completions)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
