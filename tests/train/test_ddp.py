"""A real 2-process DDP job (gloo on CPU) matches a single process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calmlm.io.loading import load_model
from calmlm.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_process_ddp_matches_single_process(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(Path(__file__).parent / "ddp_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    single = ddp_worker.model()
    Trainer(single, ddp_worker.Blocks(), ddp_worker.Blocks(4, seed=1),
            ddp_worker.config(str(tmp_path / "single"), batch_size=4)).fit()
    ddp = load_model(out / "checkpoint")
    a, b = single.state_dict(), ddp.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)

    # rank 0 alone wrote the log, with metrics averaged over both ranks (same values as one process)
    ddp_log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    one_log = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ddp_log] == [r["step"] for r in one_log] == [1, 2, 2, 3, 4, 4]
    for r, s in zip(ddp_log, one_log):
        key = "loss" if r["type"] == "train" else "val_loss"
        assert abs(r[key] - s[key]) < 1e-4
    assert ddp_log[-1]["type"] == "eval"
    rng = torch.load(out / "checkpoint" / "rng_state.pt", weights_only=True)["rng"]
    assert isinstance(rng, list) and len(rng) == 2  # one generator state per rank, for exact resume
