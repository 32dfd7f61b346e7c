"""Checkpoints written by N processes resume on another N (DDP and FSDP2, gloo CPU processes):
the losses continue as in one uninterrupted run with the same global batch. The same run checks
that every collective gets tensors on the model's device: the tensors' default device is set to
``meta`` while the step runs, so a tensor built without ``device=`` is caught."""

import functools
import shutil

import pytest
import torch
import torch.distributed as dist

from ssmkit import LanguageModel, ModelConfig
from ssmkit.tasks import SelectiveCopying
from ssmkit.testing import run_on_ranks
from ssmkit.training import TrainConfig, Trainer

STEPS, SPLIT = 4, 2
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "reduce_scatter", "all_to_all_single")


def _trainer(out_dir, strategy="ddp"):
    torch.manual_seed(0)
    task = SelectiveCopying(length=16, n_tokens=3, vocab=8)
    model = LanguageModel(ModelConfig.from_name("tiny-hybrid", vocab_size=task.vocab_size, d_model=32))
    cfg = TrainConfig(steps=STEPS, batch_size=4, lr=3e-3, warmup_steps=1, progress=False, threads=1, seed=3,
                      device="cpu", eval_batches=1, eval_batch_size=2, strategy=strategy, out_dir=str(out_dir),
                      # MoE's balance loss is computed per rank's rows (as per micro-batch): N ranks
                      # optimise a slightly different sum than one process, so leave it out here.
                      aux_loss_weight=0.0)
    return Trainer(model, task, cfg)


def _on_cpu(f):
    @functools.wraps(f)
    def g(*args, **kwargs):
        with torch.device("cpu"):
            return f(*args, **kwargs)
    return g


def _train(out_dir, strategy="ddp", *, resume=False, steps=None, strict_device=False):
    """Losses of ``steps`` steps (to the end by default), from the checkpoint in ``out_dir`` if
    ``resume``. ``strict_device``: the trainer's own tensors default to ``meta`` (the task, the model and
    the optimizer run under an explicit CPU default), so only a tensor that follows the model's device
    reaches a collective on the CPU."""
    tr = _trainer(out_dir, strategy)
    if resume:
        assert tr.resume()
    if strict_device:
        tr.task.sample = _on_cpu(tr.task.sample)
        tr.forward = _on_cpu(lambda m, x: m(x))
        tr.optimizer.step = _on_cpu(tr.optimizer.step)
        tr.train_step = _meta_default(tr.train_step)
    out = tr.train(steps)
    tr.close()
    return out["losses"]


def _meta_default(f):
    @functools.wraps(f)
    def g(*args, **kwargs):
        with torch.device("meta"):
            return f(*args, **kwargs)
    return g


def _spy(seen):
    """Record the device of every tensor handed to a torch.distributed collective."""
    for name in COLLECTIVES:
        orig = getattr(dist, name)

        def wrapped(*args, _orig=orig, _name=name, **kwargs):
            for a in list(args) + list(kwargs.values()):
                for t in a if isinstance(a, (list, tuple)) else [a]:
                    if isinstance(t, torch.Tensor):
                        seen.append((_name, str(t.device)))
            return _orig(*args, **kwargs)

        setattr(dist, name, wrapped)


def _worker(rank, world, base):
    seen: list = []
    _spy(seen)
    res = {}
    for strategy in ("ddp", "fsdp"):
        first = _train(f"{base}/{strategy}-2ranks", strategy, steps=SPLIT, strict_device=True)
        rest = _train(f"{base}/{strategy}-from-1rank", strategy, resume=True, strict_device=True)
        res[strategy] = {"first": first, "rest": rest}
    res["seen"] = seen
    return res


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_checkpoints_resume_on_another_number_of_ranks(tmp_path):
    ref = _train(tmp_path / "ref")
    assert _train(tmp_path / "1rank", steps=SPLIT) == ref[:SPLIT]
    for strategy in ("ddp", "fsdp"):
        shutil.copytree(tmp_path / "1rank", tmp_path / f"{strategy}-from-1rank")
    got = run_on_ranks(_worker, 2, str(tmp_path))
    # float32 sums in another order (per-rank partial sums, then the all-reduce)
    close = functools.partial(pytest.approx, rel=1e-5, abs=1e-6)
    for strategy in ("ddp", "fsdp"):
        for res in got:  # 2 ranks -> from step 0, and from the 1-rank checkpoint
            assert res[strategy]["first"] == close(ref[:SPLIT]), strategy
            assert res[strategy]["rest"] == close(ref[SPLIT:]), strategy
        # the 2-rank checkpoint, resumed by one process
        assert _train(tmp_path / f"{strategy}-2ranks", resume=True) == close(ref[SPLIT:]), strategy
    devices = {d for res in got for _, d in res["seen"]}
    assert got[0]["seen"] and devices == {"cpu"}, sorted(set(got[0]["seen"]))


def test_collectives_refuse_tensors_off_the_group_device():
    from ssmkit.training import distributed as ddp

    info = ddp.DistInfo(rank=0, world_size=2, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="collective got a tensor on meta.*run on cpu"):
        ddp.all_reduce_sum(torch.zeros(2, device="meta"), info)


def test_nccl_group_is_bound_to_the_local_gpu(monkeypatch):
    """Under NCCL the group's device is cuda:LOCAL_RANK (given to init_process_group), and NCCL's
    environment (NVLink multicast off) is left as it is. No GPU needed: CUDA and the group are faked."""
    from ssmkit.training import distributed as ddp

    calls = {}
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "NCCL_NVLS_ENABLE": "0",
           "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", d))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.setdefault("init", kw))
    info = ddp.init(device=torch.device("cuda"))
    assert calls["init"]["backend"] == "nccl" and calls["init"]["device_id"] == torch.device("cuda", 1)
    assert info.device == torch.device("cuda", 1) == calls["set_device"] and info.initialized_here
    import os

    assert {k: os.environ[k] for k in env} == env


def test_trainer_refuses_a_device_other_than_the_groups(monkeypatch):
    from ssmkit.training import distributed as ddp
    from ssmkit.training import trainer

    monkeypatch.setattr(trainer.ddp, "init", lambda device=None: ddp.DistInfo(0, 2, device=torch.device("cuda", 0)))
    with pytest.raises(ValueError, match="device='cpu' does not match the process group.*cuda:0"):
        _trainer(None)


def test_position_keyed_optimizer_state_still_loads(tmp_path):
    """Checkpoints written before the optimizer state was keyed by parameter name load as before."""
    from ssmkit.training.checkpoint import rng_state

    a = _trainer(tmp_path / "a")
    a.train_step()
    state = {**a.state_dict(), "optimizer": a.optimizer.state_dict(), "step": a.step,
             "rng": rng_state()}
    assert all(isinstance(k, int) for k in state["optimizer"]["state"])
    b = _trainer(tmp_path / "b")
    b.load_state_dict(state)
    for pa, pb in zip(a.optimizer.param_groups[0]["params"], b.optimizer.param_groups[0]["params"]):
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a.optimizer.state[pa][k], b.optimizer.state[pb][k], rtol=0, atol=0)
    assert a.train_step()["loss"] == b.train_step()["loss"]
