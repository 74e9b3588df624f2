"""Run by tests/train/test_gpu_path.py under ``torchrun --nproc_per_node 2`` (gloo): one sharded training step, then
what the GPU path depends on, written to OUT/rank<N>.json. Not a test module (no test_ prefix)."""

import json
import sys
import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from rcsd_cli.configs.train import TrainConfig
from rcsd_cli.data.artifacts import read_artifact
from rcsd_cli.data.options import build_config
from rcsd_cli.modeling import distributed as dist
from rcsd_cli.modeling import sharding
from rcsd_cli.train import checkpoints, trainer
from rcsd_cli.train.methods import step_for
from rcsd_cli.train.rollout_engines import module_weights


def main(model: str, rubrics: str, out: str, offload: str) -> None:
    out_dir = Path(out)
    rows = read_artifact(Path(rubrics), "rubrics")[0]
    cfg = build_config(TrainConfig, {"model": model, "sharding": "shard-grad-op", "offload": offload, "steps": 2,
                                     "batch_size": 4, "micro_batch_size": 2, "max_new_tokens": 4, "temperature": 0,
                                     "lr": 1e-3, "precision": "fp32"})
    dist.setup(always=True)  # as ``rcsd train`` does: one launched process shards too
    run = trainer.setup(cfg, out_dir, False, False)
    report = {"rank": run.rank, "world": run.world}
    trainer.run_step(run, step_for(cfg), rows, 0)
    report["teacher_sharded_after_step"] = all(isinstance(p, DTensor) for p in run.teacher.parameters())
    report["student_sharded_after_step"] = all(isinstance(p, DTensor) for p in run.student.parameters())

    gathered = []
    real_full = DTensor.full_tensor

    def spy(self, *args, **kwargs):
        gathered.append(str(self.dtype))
        return real_full(self, *args, **kwargs)

    DTensor.full_tensor = spy
    t0 = time.perf_counter()
    pushed = dict(module_weights(run.student, torch.bfloat16))
    report["push_seconds"] = round(time.perf_counter() - t0, 3)
    DTensor.full_tensor = real_full
    embed = next(p for n, p in sharding.unwrap(run.student).named_parameters() if n.endswith("embed_tokens.weight"))
    report["gathered_dtypes"] = sorted(set(gathered))
    report["pushed_dtypes"] = sorted({str(v.dtype) for v in pushed.values()})
    report["pushed_embedding_matches"] = bool(torch.equal(pushed["model.embed_tokens.weight"],
                                                          embed.full_tensor().to(torch.bfloat16)))

    ckpt = out_dir / "checkpoint-1"
    t0 = time.perf_counter()
    checkpoints.save_checkpoint(ckpt, run.student, run.teacher, run.tok, run.optimizer, run.scheduler, 1, cfg,
                                run.metrics)
    dist.barrier()
    report["checkpoint_seconds"] = round(time.perf_counter() - t0, 3)
    before = [s["exp_avg"].to_local().clone() for s in run.optimizer.state.values()]
    for state in run.optimizer.state.values():
        state["exp_avg"].to_local().zero_()
    loads, states = [], []
    real_load, real_set = torch.load, sharding.load_optimizer_state

    def load_spy(*args, **kwargs):
        if str(args[0]).endswith("optimizer.pt"):
            loads.append(str(kwargs.get("map_location")))
        return real_load(*args, **kwargs)

    def set_spy(module, optimizer, state, **kwargs):
        states.append(len(state))
        return real_set(module, optimizer, state, **kwargs)

    torch.load, sharding.load_optimizer_state = load_spy, set_spy
    checkpoints.load_optimizer(ckpt, run.student, run.optimizer, run.scheduler)
    torch.load, sharding.load_optimizer_state = real_load, real_set
    after = [s["exp_avg"].to_local() for s in run.optimizer.state.values()]
    report["load_map_locations"] = loads
    report["optimizer_entries_read"] = states
    report["optimizer_restored"] = len(before) == len(after) > 0 and all(
        torch.equal(a, b) for a, b in zip(before, after, strict=True))
    (out_dir / f"rank{run.rank}.json").write_text(json.dumps(report))
    run.rollouts.close()
    dist.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
