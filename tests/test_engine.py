"""Engine units: optimiser groups, schedules, keyed randomness, checkpoints, signals."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
from torch import nn

from hcformer.config import SolverConfig
from hcformer.engine import checkpoint, randomness, signals
from hcformer.engine.distributed import environment, first_host
from hcformer.engine.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from hcformer.errors import HCFormerError

torch.set_num_threads(1)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.backbone.scale = nn.Parameter(torch.tensor(0.1))
        self.query = nn.Embedding(5, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)


def test_param_groups_backbone_lr_and_no_decay_on_norms_and_embeddings():
    solver = SolverConfig(lr=1e-3, weight_decay=0.05, backbone_multiplier=0.1)
    groups = param_groups(Toy(), solver)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["backbone.0.weight"]["lr"] == pytest.approx(1e-4)
    assert by_name["backbone.0.weight"]["weight_decay"] == 0.05
    assert by_name["backbone.1.weight"]["weight_decay"] == 0.0  # BatchNorm affine
    assert by_name["backbone.scale"]["lr"] == pytest.approx(1e-4)  # s(i) at the backbone's rate
    assert by_name["query.weight"]["weight_decay"] == 0.0
    assert by_name["norm.bias"]["weight_decay"] == 0.0
    assert by_name["head.weight"]["lr"] == pytest.approx(1e-3)
    assert by_name["head.weight"]["weight_decay"] == 0.05
    assert len(by_name) == sum(1 for _ in Toy().parameters())
    assert len(groups) == 4  # (lr, decay): backbone/head x decay/none
    assert all(len(g["params"]) == len(g["names"]) for g in groups)


def test_poly_step_and_warmup_schedules():
    poly = SolverConfig(iterations=100, schedule="poly", poly_power=0.9)
    assert lr_factor(0, poly) == 1.0
    assert lr_factor(50, poly) == pytest.approx(0.5**0.9)
    step = SolverConfig(iterations=1000, schedule="step", steps=[0.889, 0.963], gamma=0.1)
    assert [lr_factor(i, step) for i in (0, 888, 889, 962, 963)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01]
    )
    warm = SolverConfig(iterations=100, schedule="poly", warmup_iters=10, warmup_factor=0.01)
    assert lr_factor(0, warm) == pytest.approx(0.01)
    assert lr_factor(5, warm) == pytest.approx((0.01 * 0.5 + 0.5) * (1 - 0.05) ** 0.9)
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, poly)
    sched = build_scheduler(opt, poly)
    for _ in range(50):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(poly.lr * 0.5**0.9)


def test_keyed_randomness_is_a_function_of_its_key():
    a = randomness.augmentation_rng(3, 10, 2).random(4)
    assert np.array_equal(a, np.random.default_rng([3, 10, 2]).random(4))
    assert not np.array_equal(a, randomness.augmentation_rng(3, 10, 3).random(4))
    g1 = torch.rand(3, generator=randomness.point_generator(0, 5, 1))
    g2 = torch.rand(3, generator=randomness.point_generator(0, 5, 1))
    assert torch.equal(g1, g2)
    # Data order: every epoch visits each image once.
    seen = [randomness.dataset_index(7, p, 10) for p in range(20)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]


def test_checkpoint_atomic_keeps_previous_and_loads_weights_only(tmp_path):
    ckpt = tmp_path / "checkpoints"
    checkpoint.save_checkpoint({"iteration": 1, "w": torch.ones(2)}, ckpt)
    checkpoint.save_checkpoint({"iteration": 2, "w": torch.zeros(2)}, ckpt)
    assert checkpoint.load_checkpoint(ckpt / "last.pt")["iteration"] == 2
    assert checkpoint.load_checkpoint(ckpt / "prev.pt")["iteration"] == 1
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.pt", "prev.pt"]  # no temporary left
    (ckpt / "last.pt").write_bytes(b"garbage")
    with pytest.raises(HCFormerError, match="last.pt: not a readable checkpoint"):
        checkpoint.load_checkpoint(ckpt / "last.pt")
    with pytest.raises(HCFormerError, match="no such checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "none.pt")
    assert checkpoint.latest_checkpoint(tmp_path / "empty") is None


def test_request_stop_and_signal_exit_codes():
    signals.reset()
    assert not signals.stop_requested()
    signals.request_stop()
    assert signals.stop_requested() and signals.exit_code() == signals.EXIT_STOPPED
    signals.reset()
    with signals.handle_signals():
        os.kill(os.getpid(), signal.SIGTERM)
    assert signals.stop_requested() and signals.exit_code() == 143
    signals.reset()
    assert signals.save_now() is None  # no loop running


def test_distributed_environment(monkeypatch):
    for key in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "SLURM_NTASKS",
        "SLURM_PROCID",
        "SLURM_LOCALID",
    ):
        monkeypatch.delenv(key, raising=False)
    assert environment().world_size == 1
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    info = environment()
    assert (info.rank, info.world_size, info.local_rank) == (3, 4, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert environment().world_size == 2 and environment().rank == 1  # torchrun's wins
    assert first_host("gpu[03-05,9],cpu1") == "gpu03"
    assert first_host("node7") == "node7"


def test_save_now_from_a_signal_handler_writes_the_last_completed_iteration(tmp_path):
    """What submitit's checkpoint() may do: save synchronously from the handler."""
    from hcformer.engine.train import Trainer

    class Loop(Trainer):
        def __init__(self) -> None:  # only what save() needs
            import threading

            from hcformer.engine.distributed import DistInfo

            self.dist = DistInfo()
            self.run_dir = tmp_path
            self.iteration = 7
            self._update_lock = threading.Lock()
            self._pending = []  # no step since the last read

        def state(self):
            return {"iteration": self.iteration}

    loop = Loop()
    signals.register_saver(loop.save)
    previous = signal.signal(signal.SIGUSR2, lambda *_: signals.save_now())
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
    finally:
        signal.signal(signal.SIGUSR2, previous)
        signals.register_saver(None)
    assert checkpoint.load_checkpoint(tmp_path / "checkpoints" / "last.pt") == {"iteration": 7}
