"""Decoding speed of rcsd's own loop: plain (dynamic cache, host sync per token) vs static cache,
with and without a compiled step; prints medians and ratios as a Markdown table.

Rounds alternate between the variants so that machine noise hits each alike. Every variant must
return the same tokens (checked); ``ignore_eos`` makes every row generate exactly N tokens.

    python benchmarks/bench_decoding.py --batch 8 32 --new-tokens 128 --rounds 3
    python benchmarks/bench_decoding.py --model /path/to/model --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch

    from rcsd_cli.configs.groups import GenerationConfig
    from rcsd_cli.modeling import generation, precision
    from rcsd_cli.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="Model (default: the embedded SmolLM2-135M-Instruct).")
    ap.add_argument("--batch", type=int, nargs="+", default=[8])
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[128])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", default=None, choices=precision.PRECISIONS,
                    help="fp32 / bf16-mixed (fp32 weights, bf16 autocast) / bf16 weights; default: CUDA bf16-mixed")
    ap.add_argument("--variants", nargs="+", default=["plain", "static", "compiled"])
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choice = precision.resolve(args.precision, device.type)
    lm = load_model(args.model, device=device, dtype=precision.param_dtype(choice))
    model, tok = lm.model, lm.tokenizer
    stop = torch.tensor([-1], device=device)

    def run(variant, batch, new):
        cfg = GenerationConfig(max_new_tokens=new, temperature=1.0, top_k=20, top_p=0.95, ignore_eos=True)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(100, len(tok) - 100, (batch, args.prompt_tokens), generator=g).to(device)
        attention = torch.ones_like(prompts)
        gens = [torch.Generator(device=device).manual_seed(i) for i in range(batch)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad(), precision.compute(choice, device.type):
            if variant == "plain":
                rows = generation._decode(model, prompts, attention, cfg, gens, stop, tok.pad_token_id)
            else:  # slots of a static cache (refilled continuously; here every row runs to N tokens)
                rows = generation._decode_static(model, prompts.tolist(), cfg, list(range(batch)), stop,
                                                 tok.pad_token_id, rows=batch, compiled=variant == "compiled")
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, rows

    print(f"device {device}, precision {choice}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| batch x new tokens | " + " | ".join(f"{v} tok/s" for v in args.variants) + " | "
          + " | ".join(f"{v}/plain" for v in args.variants if v != "plain") + " |")
    print("|" + " --- |" * (1 + 2 * len(args.variants) - 1))
    for batch in args.batch:
        for new in args.new_tokens:
            for v in args.variants:  # warm-up (and compilation) outside the timed rounds
                run(v, batch, min(new, 16))
            times = {v: [] for v in args.variants}
            outputs = {}
            for _ in range(args.rounds):
                for v in args.variants:
                    seconds, rows = run(v, batch, new)
                    times[v].append(seconds)
                    outputs[v] = rows
            same = all(outputs[v] == outputs[args.variants[0]] for v in args.variants)
            tps = {v: batch * new / statistics.median(times[v]) for v in args.variants}
            base = tps.get("plain")
            ratios = [f"{tps[v] / base:.2f}x" for v in args.variants if v != "plain" and base]
            print(f"| {batch} x {new} | " + " | ".join(f"{tps[v]:.0f}" for v in args.variants) + " | "
                  + " | ".join(ratios) + " |" + ("" if same else "  (OUTPUTS DIFFER)"))


if __name__ == "__main__":
    main()
