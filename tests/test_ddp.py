"""DDP: observer statistics are all-reduced so every rank keeps identical quantizer state."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]


def _worker(rank: int, world: int, port: int, out_dir: str, sync: bool) -> None:
    sys.path.insert(0, str(REPO))
    from src.env import prepare_environment

    prepare_environment()
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from ultralytics.nn.tasks import DetectionModel

    from src.config import load_config
    from src.models.yolov8_qat import prepare_qat_model, quantizers

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # identical initial model on every rank
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    prepare_qat_model(model, load_config(str(REPO / "configs/qat_config.yaml")))
    if not sync:
        for _, q in quantizers(model):
            q.observer.sync_distributed = False
    ddp = DDP(model, broadcast_buffers=False)  # as Ultralytics wraps it: buffers are not broadcast
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data shard
    for _ in range(3):
        x = torch.rand(2, 3, 64, 64, generator=gen) * (1 + rank)
        out = ddp(x)
        loss = sum(v.float().pow(2).mean() for v in out.values() if isinstance(v, torch.Tensor))
        loss.backward()
        opt.step()
        opt.zero_grad()
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if "qat_quantizers" in k or "weight_quant" in k}
    torch.save(state, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _grad_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    sys.path.insert(0, str(REPO))
    import torch.distributed as dist

    from src.training.trainer import average_gradients, broadcast_parameters

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    a, b, unused = (torch.nn.Parameter(torch.full(shape, float(rank))) for shape in ((3,), (2, 2), (1,)))
    a.grad = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)  # rank 0: 1x, rank 1: 2x
    if rank == 0:
        b.grad = torch.full((2, 2), 4.0)  # rank 1 never computed one
    average_gradients([a, b, unused], world)
    broadcast_parameters([a, b])
    torch.save({"a": a.grad, "b": b.grad, "unused": unused.grad, "a_value": a.detach(), "b_value": b.detach()},
               Path(out_dir) / f"grad{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_parameters_outside_ddp_get_the_rank_mean_gradient(tmp_path):
    """Distillation adapters live outside the DDP module: broadcast once and gradients averaged by hand, like DDP."""
    mp.spawn(_grad_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    g0, g1 = (torch.load(tmp_path / f"grad{r}.pt", weights_only=True) for r in (0, 1))
    for g in (g0, g1):
        assert torch.equal(g["a"], torch.tensor([1.5, 3.0, 4.5]))
        assert torch.equal(g["b"], torch.full((2, 2), 2.0))
        assert g["unused"] is None  # no rank used it: no gradient, so momentum does not move it
        # values start as rank 0's on every rank
        assert torch.equal(g["a_value"], torch.zeros(3)) and torch.equal(g["b_value"], torch.zeros(2, 2))


def test_extra_loss_keeps_its_weight_against_the_detection_loss_under_ddp(tiny_dataset, tmp_path, monkeypatch):
    """DDP averages gradients over ranks, so each rank's loss is multiplied by world_size (Ultralytics' convention):
    the distillation term must get the same factor, or it weighs 1/world_size against the detection loss."""
    import copy

    from ultralytics.nn.tasks import DetectionModel

    from src.config import load_config
    from src.data.resolve import resolve_data
    from src.models.yolov8_qat import prepare_qat_model
    from src.training.data import build_loader
    from src.training.trainer import QATTrainer

    cfg = load_config(None, {"train_params.img_size": 64, "train_params.batch_size": 8, "train_params.device": "cpu",
                             "train_params.workers": 0})
    data = resolve_data(str(tiny_dataset))
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    prepare_qat_model(model, cfg)
    trainer = QATTrainer(model, cfg, data, str(tiny_dataset), torch.device("cpu"), tmp_path, None,
                         validate_each_epoch=False)
    seen = {}
    detection_loss = model.loss

    def loss(batch, preds):
        out = detection_loss(batch, preds)
        seen["det"] = float(out[0].sum())
        return out

    def extra_loss(preds, batch):
        kd = preds["scores"].float().abs().mean() / 10  # any differentiable term of the outputs, ~1 here
        seen["kd"] = float(kd)
        return kd, {}

    monkeypatch.setattr(model, "loss", loss)
    trainer.extra_loss = extra_loss
    monkeypatch.setattr(trainer.scaler, "scale", lambda total: seen.__setitem__("total", float(total)) or total)
    # one rank standing in for two: the collectives the trainer calls are the identity on a single rank
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, *a, **k: None)
    batch = next(iter(build_loader(trainer.hyp, data, "train", 8, mode="train", seed=0)))
    trainer._outside = []  # no adapters: what train() sets before the first epoch
    for world in (1, 2):
        monkeypatch.setattr(trainer, "world_size", world)
        trainer._train_epoch([copy.deepcopy(batch)], 0, nb=1, accumulate=1, warmup_iters=0)
        assert seen["det"] > 0 and seen["kd"] > 0
        # total = world x (det + kd): KD / detection is the same ratio at every world size
        assert math.isclose(seen["total"], world * (seen["det"] + seen["kd"]), rel_tol=1e-6), (world, seen)


def _run(tmp_path: Path, sync: bool) -> tuple[dict, dict]:
    port = _free_port()
    mp.spawn(_worker, args=(2, port, str(tmp_path), sync), nprocs=2, join=True)
    return (torch.load(tmp_path / "rank0.pt", weights_only=True), torch.load(tmp_path / "rank1.pt", weights_only=True))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_observer_state_identical_on_both_ranks(tmp_path):
    r0, r1 = _run(tmp_path, sync=True)
    assert r0.keys() == r1.keys()
    differing = [k for k in r0 if not torch.equal(r0[k], r1[k])]
    assert not differing, differing[:5]
    # the shards really differ: without the all-reduce the ranks' activation ranges drift apart
    (tmp_path / "nosync").mkdir()
    n0, n1 = _run(tmp_path / "nosync", sync=False)
    assert any(not torch.equal(n0[k], n1[k]) for k in n0 if k.startswith("qat_quantizers") and k.endswith("scale"))


def test_torchrun_two_cpu_processes_train_end_to_end(tiny_dataset, tmp_path):
    """The DDP training path (what --device 0,1 launches) run on CPU with gloo: one shared result, rank 0 saves."""
    import subprocess

    port = _free_port()
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "train_qat.py", "--model", "yolov8n.yaml", "--data", str(tiny_dataset), "--img-size", "64",
           "--batch-size", "4", "--device", "cpu", "--workers", "0", "--epochs", "1", "--save-dir", str(run),
           "--log-dir", str(run / "logs")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ckpt = torch.load(run / "quantized_model.pt", weights_only=True)
    assert ckpt["stage"] == "qat"
    assert len((run / "results.csv").read_text().splitlines()) == 2


def test_multi_gpu_device_list_without_gpus_is_a_clear_error(tiny_dataset, tmp_path, capsys):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs")
    from src.cli import main

    rc = main(["--model", "yolov8n.yaml", "--data", str(tiny_dataset), "--device", "0,1", "--epochs", "0",
               "--save-dir", str(tmp_path / "x")])
    assert rc == 1
    assert "0,1" in capsys.readouterr().out
