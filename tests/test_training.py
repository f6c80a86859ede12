"""QAT loop: EMA carries quantizer state, exact resume, interruption by signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.cli import main
from src.config import load_config
from src.models.yolov8_qat import prepare_qat_model, quantizers, set_observers
from src.training.ema import QATModelEMA
from src.training.trainer import QATTrainer

REPO = Path(__file__).resolve().parents[1]


def _args(tiny_dataset, run_dir, *extra):
    return ["--model", "yolov8n.yaml", "--data", str(tiny_dataset), "--img-size", "64", "--batch-size", "4",
            "--device", "cpu", "--workers", "0", "--save-dir", str(run_dir), "--log-dir", str(run_dir / "logs"),
            "--seed", "3", *extra]


def test_ema_follows_observer_freeze_with_same_ranges():
    from ultralytics.nn.tasks import DetectionModel

    cfg = load_config("configs/qat_config.yaml")
    torch.manual_seed(0)
    m = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    prepare_qat_model(m, cfg)
    ema = QATModelEMA(m)
    m.train()
    m(torch.rand(2, 3, 64, 64))  # observers move the live ranges
    ema.update(m)
    set_observers(m, False)
    ema.update(m)
    live = dict(quantizers(m))
    for name, q in quantizers(ema.ema):
        assert not bool(q.observer_enabled), name
        assert bool(q.fake_quant_enabled) == bool(live[name].fake_quant_enabled)
        if not q.is_weight and not isinstance(q.scale, torch.nn.Parameter):  # LSQ scales are averaged like weights
            assert torch.equal(q.calculate_qparams()[0], live[name].calculate_qparams()[0]), name
    # the EMA model in eval mode never moves its (frozen) ranges
    before = {n: q.calculate_qparams()[0].clone() for n, q in quantizers(ema.ema)}
    ema.ema(torch.rand(2, 3, 64, 64) * 10)
    assert all(torch.equal(before[n], q.calculate_qparams()[0]) for n, q in quantizers(ema.ema))


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def test_resume_after_epoch_1_of_2_matches_uninterrupted(tiny_dataset, tmp_path, monkeypatch):
    assert main(_args(tiny_dataset, tmp_path / "full", "--epochs", "2")) == 0
    full = _state(tmp_path / "full" / "quantized_model.pt")

    original = QATTrainer._end_epoch

    def stop_after_first(self, epoch, losses):  # what a SIGINT during epoch 2 does
        out = original(self, epoch, losses)
        self.stop_requested = True
        return out

    monkeypatch.setattr(QATTrainer, "_end_epoch", stop_after_first)
    assert main(_args(tiny_dataset, tmp_path / "cut", "--epochs", "2")) == 1  # stopped, resumable
    last = torch.load(tmp_path / "cut" / "weights" / "last.pt", weights_only=True)
    assert last["train_state"]["epoch"] == 1
    assert not (tmp_path / "cut" / "quantized_model.pt").exists()
    monkeypatch.setattr(QATTrainer, "_end_epoch", original)
    assert main(["--resume", "--save-dir", str(tmp_path / "cut"), "--device", "cpu", "--log-dir",
                 str(tmp_path / "cut" / "logs")]) == 0
    resumed = _state(tmp_path / "cut" / "quantized_model.pt")
    assert full.keys() == resumed.keys()
    for k in full:
        if k.endswith(".histogram"):
            # counts re-bin whenever the range grows, so float-ulp differences in the range move mass between
            # bins; the total must match and the scales derived from them are compared below
            assert abs(float(resumed[k].sum() - full[k].sum())) < 1e-6 * float(full[k].sum()) + 1e-9, k
            continue
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-5, atol=1e-8, msg=lambda m: f"{k}: {m}")
    rows = (tmp_path / "cut" / "results.csv").read_text().splitlines()
    assert len(rows) == 3  # header + both epochs, nothing lost or repeated


def test_resume_of_finished_run_is_refused(tiny_dataset, tmp_path, capsys):
    assert main(_args(tiny_dataset, tmp_path / "r", "--epochs", "1")) == 0
    assert main(["--resume", "--save-dir", str(tmp_path / "r"), "--device", "cpu"]) == 1
    assert "already finished" in capsys.readouterr().out


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_sigint_saves_resumable_checkpoint_and_resume_finishes(tiny_dataset, tmp_path):
    run = tmp_path / "sig"
    cmd = [sys.executable, "train_qat.py", *_args(tiny_dataset, run, "--epochs", "4")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = run / "weights" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert last.exists(), "no epoch finished"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 1, out
    assert "--resume" in out and "Traceback" not in out
    done = torch.load(last, weights_only=True)["train_state"]["epoch"]
    assert 1 <= done < 4
    r = subprocess.run([sys.executable, "train_qat.py", "--resume", "--save-dir", str(run), "--device", "cpu",
                        "--log-dir", str(run / "logs")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert torch.load(last, weights_only=True)["train_state"]["epoch"] == 4
    assert len((run / "results.csv").read_text().splitlines()) == 5
    assert (run / "quantized_model.pt").exists()


def test_finetune_qat_checkpoint_keeps_placement_and_ranges(tiny_dataset, tmp_path):
    assert main(_args(tiny_dataset, tmp_path / "base", "--epochs", "1")) == 0
    base = tmp_path / "base" / "quantized_model.pt"
    args = ["--model", str(base), "--data", str(tiny_dataset), "--epochs", "1", "--lr", "0.0001", "--img-size", "64",
            "--batch-size", "4", "--device", "cpu", "--workers", "0", "--save-dir", str(tmp_path / "ft"),
            "--log-dir", str(tmp_path / "ft" / "logs")]
    assert main(args) == 0
    a = torch.load(base, weights_only=True)
    b = torch.load(tmp_path / "ft" / "quantized_model.pt", weights_only=True)
    assert a["placement"] == b["placement"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    # activation ranges stay as trained (observers frozen); weights moved
    frozen = [k for k in a["state_dict"] if k.startswith("qat_quantizers") and k.endswith("observer.min_val")]
    assert frozen and all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in frozen)
    assert not torch.equal(a["state_dict"]["model.2.cv1.conv.weight"], b["state_dict"]["model.2.cv1.conv.weight"])
    assert b["config"]["train_params"]["lr"] == 0.0001


@pytest.mark.parametrize("scheduler", ["cosine", "linear"])
def test_lr_schedule_matches_ultralytics(scheduler):
    """Same recipe as `yolo train` so comparisons with Ultralytics' own QAT are fair."""
    from ultralytics.utils.torch_utils import one_cycle

    from src.training.trainer import lr_factor

    cfg = load_config("configs/qat_config.yaml", {"train_params.lr_scheduler": scheduler})
    for epochs in (1, 2, 5):
        ul = one_cycle(1, 0.01, epochs) if scheduler == "cosine" else (lambda x: (1 - x / epochs) * 0.99 + 0.01)
        for e in range(epochs):
            assert lr_factor(cfg, e, epochs) == pytest.approx(ul(e), abs=1e-12)
    assert lr_factor(cfg, 1, 2) == pytest.approx(0.505)  # both schedules: half-way between 1 and 0.01
