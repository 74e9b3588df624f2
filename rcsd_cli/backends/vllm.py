"""vLLM offline engine backend (``pip install rcsd[vllm]``; see the README for the CPU recipe).

Before the engine starts, one line says what is loaded and how much memory it may take. The
engine receives prompt token ids (``TokensPrompt``) and returns completion token ids, so
artifacts match the other backends. ``teacher_topk`` scores given completions with prompt
log-probs, for ``score --teacher-logprobs``.
"""

from __future__ import annotations

import os

from rcsd_cli.errors import RcsdError
from rcsd_cli.generation import Generation
from rcsd_cli.schemas import BackendConfig
from rcsd_cli.ui import info


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMBackend:
    name = "vllm"

    def __init__(self, cfg: BackendConfig, model_name: str, trust_remote_code: bool = False):
        if not vllm_available():
            raise RcsdError("--backend vllm needs vLLM: pip install 'rcsd[vllm]' (see README, 'Scaling out')")
        from vllm import LLM

        from rcsd_cli.models import load_tokenizer, resolve_model

        path = resolve_model(model_name)
        self.tokenizer = load_tokenizer(model_name, trust_remote_code)
        try:
            import torch

            gpu = torch.cuda.is_available()
            total = torch.cuda.get_device_properties(0).total_memory / 2**30 if gpu else 0.0
        except Exception:  # noqa: BLE001 - memory report only
            gpu, total = False, 0.0
        if gpu:
            share = cfg.memory_utilization or 0.85
            info(f"vllm: loading {path} (tensor parallel {cfg.tensor_parallel_size}); it may take up to "
                 f"{share:.0%} of each GPU's {total:.1f} GiB (--memory-utilization)")
        else:
            share = cfg.memory_utilization or 0.3
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
            info(f"vllm: loading {path} on CPU; it may reserve up to {share:.0%} of this machine's {ram:.1f} GiB "
                 "(--memory-utilization)")
        try:
            self.llm = LLM(model=path, tokenizer=path, trust_remote_code=trust_remote_code,
                           tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=share, seed=0)
        except Exception as exc:  # noqa: BLE001 - the engine's own log above has the details
            raise RcsdError(f"vllm: engine failed to start ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:160]})") from exc

    def _run(self, prompts, params):
        try:
            return self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as exc:  # noqa: BLE001 - engine failures become one clean line
            raise RcsdError(f"vllm: generation failed ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:160]})") from exc

    def _params(self, cfg, seed, **extra):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k if cfg.top_k else -1, seed=seed, **extra)

    def generate(self, prompts, cfg, seed, on_done=None, seeds=None):
        from vllm.inputs import TokensPrompt

        from rcsd_cli.generation import item_seed

        seeds = seeds if seeds is not None else [item_seed(seed, i) for i in range(len(prompts))]
        results = []
        for start in range(0, len(prompts), max(cfg.batch_size, 64)):
            chunk = prompts[start: start + max(cfg.batch_size, 64)]
            params = [self._params(cfg, seeds[start + i] % 2**31) for i in range(len(chunk))]
            outs = self._run([TokensPrompt(prompt_token_ids=p) for p in chunk], params)
            batch = []
            for out in outs:
                o = out.outputs[0]
                batch.append(Generation(list(o.token_ids), o.text, "stop" if o.finish_reason == "stop" else "length"))
            results.extend(batch)
            if on_done:
                on_done(list(range(start, start + len(batch))), batch)
        return results

    def teacher_topk(self, teacher_prompts, completions, k):
        """Top-k (ids, log-probs) of the teacher at every completion position, from prompt log-probs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=0.0)
        outs = self._run([TokensPrompt(prompt_token_ids=p + c)
                          for p, c in zip(teacher_prompts, completions, strict=True)], params)
        ids, lps = [], []
        for out, p, c in zip(outs, teacher_prompts, completions, strict=True):
            row_i, row_v = [], []
            for pos in range(len(p), len(p) + len(c)):  # logprobs at pos are for the token at pos
                entries = sorted(out.prompt_logprobs[pos].items(), key=lambda kv: -kv[1].logprob)[:k]
                row_i.append([t for t, _ in entries])
                row_v.append([round(v.logprob, 5) for _, v in entries])
            ids.append(row_i)
            lps.append(row_v)
        return ids, lps
