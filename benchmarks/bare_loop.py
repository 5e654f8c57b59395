"""A bare distributed training loop, the baseline of ``train_throughput.py``.

Run under torchrun: ``torchrun --nproc_per_node 2 benchmarks/bare_loop.py --strategy ddp``.
Same model, data, batches and optimizer as ``orchestrator train`` on the job file, but with none
of the orchestrator around it: plain torch DDP (or a plain ``deepspeed.initialize``) and AdamW.
It prints progress lines in the orchestrator's format so both are parsed the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

from orchestrator import data as data_lib
from orchestrator import models
from orchestrator.config import load_job
from orchestrator.strategies import build_ds_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", default="jobs/minilm_mr_finetune.yaml")
    ap.add_argument("--strategy", choices=["ddp", "deepspeed"], default="ddp")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10)
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    overrides = [f"train.strategy={args.strategy}", f"train.max_steps={args.steps}"]
    if args.strategy == "deepspeed":
        overrides.append(f"train.zero_stage={args.zero_stage}")
    spec = load_job(args.job, overrides)
    tok = models.build_tokenizer(spec.model)
    bundle = data_lib.build(spec.data, tok)
    model = models.build_model(spec.model, bundle.num_labels, tok, seed=spec.train.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.train.lr, foreach=False)
    if args.strategy == "ddp":
        engine = torch.nn.parallel.DistributedDataParallel(model)
    else:
        import deepspeed

        engine, optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=build_ds_config(spec.train, world),
            dist_init_required=False,
        )
    engine.train()
    bs = spec.train.batch_size
    step, epoch = 0, 0
    window_start, samples = time.perf_counter(), 0
    while step < args.steps:
        for batch in bundle.train_batches(bs, rank, world, spec.train.seed, epoch):
            loss = engine(**batch).loss
            if args.strategy == "ddp":
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                engine.backward(loss)
                engine.step()
            step += 1
            samples += bs * world
            if step % args.log_every == 0 or step == 1:
                t = torch.tensor([time.perf_counter() - window_start])
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                if rank == 0:
                    sys.stdout.write(
                        f"[orchestrator] step {step}/{args.steps} | loss "
                        f"{loss.item():.4f} | {samples / t.item():.1f} samples/s\n"
                    )
                    sys.stdout.flush()
                window_start, samples = time.perf_counter(), 0
            if step >= args.steps:
                break
        epoch += 1
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
