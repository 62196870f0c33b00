"""Resume training after a crash with dcp_cloud.CheckpointManager.

A small model trains in a child process that saves every few steps (keeping the last 2) and is
SIGKILLed mid-run, as a preempted node would be. The script then resumes from the newest
committed step and trains on: the losses after the resume are the very ones the killed run
printed for the same steps, because model, optimizer and data position all come back.

By default it starts a local S3 server (moto) on 127.0.0.1; --url uses a real bucket with
credentials from the standard AWS environment:

    python examples/resume_training.py
    python examples/resume_training.py --url s3://my-bucket/runs/resume-demo
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import uuid
import warnings
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from dcp_cloud.tools.manager import CheckpointManager

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
warnings.filterwarnings("ignore", category=FutureWarning)

LOSS_LINE = re.compile(r"step +(\d+) +loss (\S+)")
SAVE_EVERY = 5
KEEP_LAST = 2


def build() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of one step: a function of the step, so a resumed run sees what it would have."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(64, 32, generator=g)
    w = torch.linspace(-1, 1, 32, dtype=x.dtype).unsqueeze(1) / 4
    return x, torch.tanh(x @ w)


def train(manager: CheckpointManager, steps: int, tag: str) -> dict[int, str]:
    """Train up to ``steps``, resuming from the newest committed checkpoint if there is one.
    Returns the loss printed at each step."""
    torch.set_num_threads(1)  # bitwise-reproducible losses across the two runs
    model, optimizer = build()
    start = 0
    losses: dict[int, str] = {}
    if manager.latest() is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        start = manager.load(state)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        print(f"[{tag}] resumed from step {start} ({manager.step_url(start)})", flush=True)
    for step in range(start + 1, steps + 1):
        x, y = batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses[step] = f"{loss.item():.6f}"
        print(f"[{tag}] step {step:3d}  loss {losses[step]}", flush=True)
        if step % SAVE_EVERY == 0:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            manager.save(step, {"model": model_sd, "optim": optim_sd})
            print(f"[{tag}] saved step {step}", flush=True)
    return losses


def run_and_kill(args: argparse.Namespace, options: dict[str, Any]) -> dict[int, str]:
    """Train in a child process and SIGKILL it at step ``--kill-at``; returns its losses."""
    command = [sys.executable, __file__, "--child", "--url", args.url, "--steps", str(args.steps)]
    env = {**os.environ, "DCP_CLOUD_EXAMPLE_OPTIONS": json.dumps(options)}
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    losses: dict[int, str] = {}
    for line in child.stdout:
        print(line, end="")
        match = LOSS_LINE.search(line)
        if match:
            losses[int(match.group(1))] = match.group(2)
            if int(match.group(1)) >= args.kill_at:
                child.send_signal(signal.SIGKILL)
                break
    child.wait()
    print(f"[parent] SIGKILLed the training process after step {max(losses)} (exit {child.returncode})")
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="run prefix (default: a local S3 server started here)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--kill-at", type=int, default=28, help="step after which the first run is killed")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        child_options = json.loads(os.environ.get("DCP_CLOUD_EXAMPLE_OPTIONS", "{}"))
        train(
            CheckpointManager(args.url, keep_last=KEEP_LAST, storage_options=child_options),
            args.steps,
            "run 1",
        )
        return

    with ExitStack() as stack:
        options: dict[str, Any] = {}
        if args.url is None:
            from dcp_cloud.testing import S3Server

            server = stack.enter_context(S3Server())
            server.create_bucket("examples")
            options = server.storage_options
            args.url = f"s3://examples/resume-{uuid.uuid4().hex[:8]}"
            print(f"[parent] local S3 server on {server.endpoint_url}; run at {args.url}")

        before = run_and_kill(args, options)
        manager = CheckpointManager(args.url, keep_last=KEEP_LAST, storage_options=options)
        print(f"[parent] committed steps now: {manager.steps()} (keep_last={KEEP_LAST})")

        after = train(manager, args.steps, "run 2")
        same = [s for s in sorted(after) if s in before]
        match = all(before[s] == after[s] for s in same)
        print(
            f"[parent] steps {same[0]}-{same[-1]} ran twice; losses identical: {match}"
            if same
            else "[parent] no step ran twice"
        )
        print(f"[parent] committed steps at the end: {manager.steps()}")
        if not match:
            sys.exit(1)


if __name__ == "__main__":
    main()
