"""The trainer with each sequence sharded over 2 ranks, composed with 2-way FSDP2 on a 2-D mesh
(4 gloo CPU processes) and activation checkpointing, trains like one process with the whole
batch: same losses, evaluation and parameters."""

import pytest
import torch

from ssmkit import LanguageModel, ModelConfig
from ssmkit.tasks import SelectiveCopying
from ssmkit.testing import run_on_ranks
from ssmkit.training import TrainConfig, Trainer

STEPS = 3


def _train(context_parallel=1, strategy="ddp", checkpointing=False):
    torch.manual_seed(0)
    task = SelectiveCopying(length=16, n_tokens=3, vocab=8)
    model = LanguageModel(ModelConfig(d_model=16, n_layer=4, vocab_size=task.vocab_size, layer_pattern="M2GA",
                                      ssm_cfg={"d_state": 4}, mamba2_cfg={"d_state": 4, "headdim": 8, "chunk_size": 4},
                                      deltanet_cfg={"num_heads": 2, "head_dim": 4, "chunk_size": 4},
                                      attn_cfg={"n_heads": 2}))
    cfg = TrainConfig(steps=STEPS, batch_size=4, lr=3e-3, warmup_steps=1, progress=False, threads=1, seed=3,
                      device="cpu", eval_batches=1, eval_batch_size=2, strategy=strategy,
                      context_parallel=context_parallel, activation_checkpointing=checkpointing)
    tr = Trainer(model, task, cfg)
    out = tr.train()
    params = [p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
              for p in tr.module.parameters()]
    tr.close()
    return {"losses": out["losses"], "eval": out["eval"]["eval"], "params": params}


def _worker(rank, world):
    return _train(context_parallel=2, strategy="fsdp", checkpointing=True)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_context_parallel_with_fsdp_matches_one_process():
    single = _train()
    got = run_on_ranks(_worker, 4)
    for res in got:
        assert res["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)
        assert res["eval"] == pytest.approx(single["eval"], rel=1e-5, abs=1e-6)
        for a, b in zip(single["params"], res["params"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_context_parallel_is_checked():
    with pytest.raises(ValueError, match="context_parallel must be a positive int"):
        TrainConfig(context_parallel=0)
    with pytest.raises(ValueError, match="activation_checkpointing must be a bool"):
        TrainConfig(activation_checkpointing=1)
