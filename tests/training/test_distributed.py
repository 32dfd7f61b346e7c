"""2-process gloo DDP (and FSDP2) on the CPU gives the same losses as 1 process with the doubled batch."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from ssmkit.tasks import SelectiveCopying
from ssmkit.training import TrainConfig, Trainer, load_latest
from tests.training.tiny_models import TinyRNN

STEPS = 5


def run(batch_size, accum_steps=1, strategy="ddp", out_dir=None):
    torch.manual_seed(0)
    task = SelectiveCopying(length=16, n_tokens=3, vocab=8)
    cfg = TrainConfig(steps=STEPS, batch_size=batch_size, accum_steps=accum_steps, lr=3e-3, warmup_steps=1,
                      progress=False, threads=1, seed=3, device="cpu", eval_batches=1, strategy=strategy,
                      out_dir=out_dir, checkpoint_every=STEPS if out_dir else 0)
    tr = Trainer(TinyRNN(task.vocab_size, dropout=0.0), task, cfg)
    out = tr.train()
    params = [p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
              for p in tr.module.parameters()]
    tr.close()
    return out, params


def _worker(rank, world, port, out_path, strategy):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    out, params = run(batch_size=8, accum_steps=2, strategy=strategy, out_dir=str(out_path) + ".ckpt")
    if rank == 0:
        torch.save({"losses": out["losses"], "params": params}, out_path)
    # Leave without running interpreter-exit destructors: a CI run once saw a worker abort there
    # ("terminate called without an active exception": a C++ thread still joinable at exit),
    # after all of its work was done and written.
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_gloo_matches_one_process(tmp_path, strategy):
    single, p1 = run(batch_size=8)
    out_path = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out_path), strategy), nprocs=2, join=True)
    got = torch.load(out_path, weights_only=True)
    assert got["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6), json.dumps(
        {"ddp": got["losses"], "single": single["losses"]})
    for a, b in zip(p1, got["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The checkpoint holds full (unsharded) tensors: it loads into a single-process model.
    state = load_latest(str(out_path) + ".ckpt")
    assert state["step"] == STEPS and state["world_size"] == 2
    model = TinyRNN(8, dropout=0.0)
    model.load_state_dict(state["model"])
    torch.testing.assert_close(list(model.parameters()), p1, rtol=1e-5, atol=1e-6)
