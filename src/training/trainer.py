"""The QAT training loop: our own small loop over Ultralytics' dataloader, v8DetectionLoss and DetectionValidator.

Why not subclass Ultralytics' DetectionTrainer: its save path pickles ``deepcopy(ema).half()`` (fp16 scales,
non-atomic), its final_eval re-saves through strip_optimizer, its resume reads its own checkpoint layout, callbacks
run after the EMA is built and before ``model.train()`` (undoing a BN freeze), and its ``quantize=8`` path (ModelOpt)
must never trigger. A 200-line loop over the same components is easier to keep exact.

Schedule: calibrate (outside this loop), then ``epochs`` QAT epochs with fake quant on; observers freeze at
``qat_params.freeze_observers_epoch`` and (unfused) BN statistics at ``qat_params.freeze_bn_epoch``; with
``post_qat_fine_tuning`` another ``fine_tuning_epochs`` follow with observers and BN frozen and lr x 0.1.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from src.errors import QATError
from src.integrations.torch_ops import is_batch_norm, is_norm_layer
from src.integrations.ultralytics import set_loss_epoch, set_model_args
from src.models.oscillation import dampening_weight, quantized_weight_convs, weight_grid_distance
from src.models.yolov8_qat import qat_checkpoint, quantizers, refresh_weight_qparams, set_observers
from src.quantization.fake_quantize import FakeQuantize
from src.quantization.observers import nonfinite_observers, take_nonfinite_names
from src.quantization.utils import NonFiniteObservationError
from src.training.checkpoint import atomic_save, rng_state, set_rng_state
from src.training.data import build_loader, hyperparameters, loader_stride, preprocess_batch
from src.training.ema import QATModelEMA
from src.training.evaluate import evaluate

LOGGER = logging.getLogger("yolov8_qat")

MAX_NONFINITE_RETRIES = 3


class TrainingDivergedError(QATError):
    """Loss or activations became NaN/inf and retries from the last good state did not help."""


def fitness(metrics: dict) -> float:
    """Ultralytics' detection fitness: 0.1 * mAP50 + 0.9 * mAP50-95."""
    return 0.1 * metrics.get("map50", 0.0) + 0.9 * metrics.get("map50_95", 0.0)


@dataclass
class TrainState:
    """What --resume needs beyond the model: where the run stands."""

    epoch: int = 0  # next epoch to run
    best_fitness: float = -1.0
    history: list = field(default_factory=list)


def build_optimizer(model: nn.Module, cfg, lr: float) -> torch.optim.Optimizer:
    """SGD or AdamW with Ultralytics' three groups (decayed weights, undecayed norm weights, biases) plus LSQ scales.

    Quantizer parameters (LSQ scales/offsets) get ``lr * qat_params.lsq_lr_scale`` and no weight decay: decay would
    pull step sizes towards zero.
    """
    tp = cfg.train_params
    quant_params = {id(p) for m in model.modules() if isinstance(m, FakeQuantize) for p in m.parameters()}
    decay, no_decay, bias, qparams = [], [], [], []
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if id(p) in quant_params:
                qparams.append(p)
            elif pname == "bias":
                bias.append(p)
            elif is_norm_layer(module):
                no_decay.append(p)
            else:
                decay.append(p)
    batch, nbs = tp.batch_size, nominal_batch(cfg)
    accumulate = max(round(nbs / batch), 1)
    wd = tp.weight_decay * batch * accumulate / nbs  # Ultralytics' weight-decay scaling
    if tp.optimizer == "SGD":
        opt = torch.optim.SGD(bias, lr=lr, momentum=tp.momentum, nesterov=True)
    else:
        opt = torch.optim.AdamW(bias, lr=lr, betas=(tp.momentum, 0.999), weight_decay=0.0)
    opt.param_groups[0]["group"] = "bias"
    opt.add_param_group({"params": decay, "weight_decay": wd, "group": "weight"})
    opt.add_param_group({"params": no_decay, "weight_decay": 0.0, "group": "norm"})
    if qparams:
        opt.add_param_group({"params": qparams, "weight_decay": 0.0, "group": "quant",
                             "lr": lr * cfg.qat_params.lsq_lr_scale})
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return opt


def nominal_batch(cfg) -> int:
    """Images per optimizer step: ``train_params.nominal_batch_size`` or, when null, the batch size."""
    return cfg.train_params.nominal_batch_size or cfg.train_params.batch_size


def lr_factor(cfg, epoch: int, epochs: int, lrf: float = 0.01) -> float:
    """Per-epoch lr multiplier, exactly Ultralytics' schedules: cosine (one_cycle) or linear from 1 towards ``lrf``
    over ``epochs`` (epoch ``epochs - 1`` is the last one run, so the floor itself is never reached — with the default
    2 epochs the second runs at about half the lr, as ``yolo train`` would)."""
    if cfg.train_params.lr_scheduler == "cosine":
        from ultralytics.utils.torch_utils import one_cycle  # deferred: imported after src.env prepared Ultralytics

        return one_cycle(1, lrf, max(epochs, 1))(epoch)
    return (1 - epoch / max(epochs, 1)) * (1.0 - lrf) + lrf


class QATTrainer:
    """Runs QAT epochs on a prepared (and calibrated) model.

    Args:
        model: Fake-quantized DetectionModel.
        cfg: Resolved QATConfig.
        data: Checked Ultralytics data dict.
        data_yaml: Path of the data YAML (the validator reads it).
        device: Training device.
        save_dir: Run directory (weights/, results.csv, config.yaml).
        log_dir: TensorBoard directory.
        output_name: File name of the final model in ``save_dir``.
        extra_loss: Optional ``f(preds, batch) -> (loss, {name: value})`` added to the detection loss (distillation).
        validate_each_epoch: Run the validator after each epoch (for best.pt and results.csv).
    """

    def __init__(self, model, cfg, data: dict, data_yaml, device: torch.device, save_dir: Path, log_dir: Path | None,
                 output_name: str = "quantized_model.pt", extra_loss: Callable | None = None,
                 validate_each_epoch: bool = True, checkpoint_extra: dict | None = None):
        self.model, self.cfg, self.data, self.data_yaml = model, cfg, data, data_yaml
        self.device, self.save_dir, self.log_dir = device, Path(save_dir), log_dir
        self.output_name, self.extra_loss = output_name, extra_loss
        self.validate_each_epoch = validate_each_epoch
        self.checkpoint_extra = checkpoint_extra or {}
        tp, qp = cfg.train_params, cfg.qat_params
        self.qat_epochs = tp.epochs
        self.total_epochs = tp.epochs + (qp.fine_tuning_epochs if qp.post_qat_fine_tuning else 0)
        self.weights_dir = self.save_dir / "weights"
        self.state = TrainState()
        self._resume_rng = None
        self.stop_requested = False
        self.hyp = hyperparameters(cfg)
        set_model_args(self.model, self.hyp)  # v8DetectionLoss reads its gains from model.args
        self.model.to(device)
        self.rank, self.world_size = distributed_rank(), distributed_world_size()
        self.forward_model = self.model
        if self.world_size > 1:
            # as Ultralytics does: buffers are not broadcast (observers all-reduce their own statistics)
            self.forward_model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
        if self.world_size > 1 and self.validate_each_epoch:
            # Ultralytics' standalone validator synchronises ranks itself (torch_distributed_zero_first), so it can
            # only run once the process group is gone: evaluation happens after training (--eval)
            LOGGER.info("DDP: per-epoch validation is off; best.pt is the last epoch")
            self.validate_each_epoch = False
        self.optimizer = build_optimizer(self.model, cfg, tp.lr)
        self._dampened = quantized_weight_convs(self.model) if qp.oscillation_dampening > 0 else []
        self.ema = QATModelEMA(self.model) if tp.ema else None
        self.amp = bool(tp.amp and device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.writer = None

    # ---------------------------------------------------------------------------------------------------------------
    def _params_outside_model(self) -> list[nn.Parameter]:
        """Optimizer parameters the DDP wrapper does not see (the distillation adapters' param group)."""
        own = {id(p) for p in self.model.parameters()}
        return [p for g in self.optimizer.param_groups for p in g["params"] if id(p) not in own]

    @property
    def eval_model(self) -> nn.Module:
        """The model that is evaluated and exported: the EMA when enabled."""
        return self.ema.ema if self.ema is not None else self.model

    def _tb(self):
        if self.writer is None and self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # deferred: heavy optional dependency

            self.writer = SummaryWriter(str(self.log_dir))
        return self.writer

    def _set_epoch_switches(self, epoch: int) -> None:
        qp = self.cfg.qat_params
        fine_tuning = epoch >= self.qat_epochs
        freeze_obs = fine_tuning or (qp.freeze_observers_epoch is not None and epoch >= qp.freeze_observers_epoch)
        set_observers(self.model, not freeze_obs, histograms=False)
        # observers that run in this epoch flag non-finite statistics on the device; the step reads them once
        self._observers = [q.observer for _, q in quantizers(self.model) if q.observing]
        # the EMA's weight observers re-derive ranges from its averaged weights after each step; their flags are read
        # once at the end of the epoch (a finite loss with non-finite gradients can poison only the EMA)
        self._ema_observers = [q.observer for _, q in quantizers(self.ema.ema)] if self.ema is not None else []
        for o in self._observers + self._ema_observers:
            o.defer_finite_check = True
        self.model.train()
        freeze_bn = fine_tuning or (qp.freeze_bn_epoch is not None and epoch >= qp.freeze_bn_epoch)
        if freeze_bn:
            for m in self.model.modules():
                if is_batch_norm(m):
                    m.eval()
        if self.ema is not None:
            self.ema.sync_buffers(self.model)

    def _epoch_lr(self, epoch: int) -> float:
        if epoch >= self.qat_epochs:  # post-QAT fine-tuning: frozen ranges, lr x 0.1
            return 0.1 * lr_factor(self.cfg, self.qat_epochs - 1, self.qat_epochs)
        return lr_factor(self.cfg, epoch, self.qat_epochs)

    # ---------------------------------------------------------------------------------------------------------------
    def train(self) -> nn.Module:
        """Run (or continue) the epochs; returns the model to evaluate/export."""
        tp = self.cfg.train_params
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        stride = loader_stride(self.model)
        batch = tp.batch_size // self.world_size if self.world_size > 1 else tp.batch_size
        loader = build_loader(self.hyp, self.data, "train", batch, mode="train", stride=stride, seed=tp.seed,
                              rank=self.rank if self.world_size > 1 else -1)
        if self._resume_rng is not None:
            set_rng_state(self._resume_rng)
            self._resume_rng = None
        self._outside = self._params_outside_model()  # fixed from here on; read every optimizer step
        if self.world_size > 1:
            broadcast_parameters(self._outside)  # the adapters start equal on every rank
        nb = len(loader)
        accumulate = max(round(nominal_batch(self.cfg) / tp.batch_size), 1)
        warmup_iters = round(tp.warmup_epochs * nb) if tp.warmup_epochs > 0 else 0
        close_mosaic = getattr(self.hyp, "close_mosaic", 0)
        for epoch in range(self.state.epoch, self.total_epochs):
            if close_mosaic and epoch >= self.total_epochs - close_mosaic and hasattr(loader.dataset, "close_mosaic"):
                loader.dataset.close_mosaic(hyp=self.hyp)
            self._set_epoch_switches(epoch)
            _reseed_loader(loader, tp.seed + epoch, epoch)  # each epoch's order depends on its index: exact resume
            good_state = self._snapshot()
            for attempt in range(MAX_NONFINITE_RETRIES + 1):
                try:
                    losses = self._train_epoch(loader, epoch, nb, accumulate, warmup_iters)
                    break
                except torch.cuda.OutOfMemoryError:
                    self.optimizer.zero_grad(set_to_none=True)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    self._restore(good_state)
                    self._save_last()
                    raise QATError(
                        f"CUDA out of memory in epoch {epoch + 1} (batch {tp.batch_size}, {tp.img_size} px). Reduce "
                        f"--batch-size (e.g. {max(tp.batch_size // 2, 1)}) or --img-size, then continue with "
                        f"`python train_qat.py --resume --save-dir {self.save_dir}` (resumable checkpoint: "
                        f"{self.weights_dir / 'last.pt'})"
                    ) from None
                except _NonFinite as e:
                    if attempt == MAX_NONFINITE_RETRIES:
                        raise TrainingDivergedError(
                            f"training diverged at epoch {epoch + 1}, step {e.step}: {e.what}; retried "
                            f"{MAX_NONFINITE_RETRIES} times from the last good state. Lower --lr or check the data."
                        ) from None
                    LOGGER.warning(f"{e.what} at epoch {epoch + 1} step {e.step}; rolling back to the start of the "
                                   f"epoch (retry {attempt + 1}/{MAX_NONFINITE_RETRIES}) with lr x 0.5")
                    self._restore(good_state)
                    _reseed_loader(loader, tp.seed + epoch, epoch)
                    for g in self.optimizer.param_groups:
                        g["initial_lr"] *= 0.5
            if self.stop_requested:
                # the interrupted epoch re-runs on --resume: save the state it started from
                self._restore(good_state)
                self._save_last()
                return self.eval_model
            metrics = self._end_epoch(epoch, losses)
            self.state.epoch = epoch + 1
            self._save(metrics)
        if self.writer is not None:
            self.writer.close()
        return self.eval_model

    def _train_epoch(self, loader, epoch: int, nb: int, accumulate: int, warmup_iters: int) -> dict:
        tp = self.cfg.train_params
        self.model.train()
        self._set_epoch_switches(epoch)
        set_loss_epoch(self.model, max(min(epoch, self.qat_epochs - 1), 0))  # fine-tuning epochs keep the last QAT weights
        base = self._epoch_lr(epoch)
        sums: dict[str, float] = {}
        self.optimizer.zero_grad(set_to_none=True)
        bar = tqdm(total=nb, desc=f"Epoch {epoch + 1}/{self.total_epochs}", leave=False)
        last_step = -1
        batches = iter(loader)
        for i in range(nb):
            if self.stop_requested:
                break
            batch = next(batches)
            bar.update(1)
            ni = i + nb * epoch
            for g in self.optimizer.param_groups:
                target = g["initial_lr"] * base
                if ni < warmup_iters:
                    start = 0.1 * g["initial_lr"] if g.get("group") == "bias" else 0.0
                    target = float(np.interp(ni, [0, warmup_iters], [start, target]))
                g["lr"] = target
            batch = preprocess_batch(batch, self.device)
            with torch.autocast(self.device.type, enabled=self.amp):
                preds = self.forward_model(batch["img"])
                loss, items = self.model.loss(batch, preds)
                loss = loss.sum()
                items = dict(items) if isinstance(items, dict) else {f"loss{j}": v for j, v in enumerate(items)}
                if self.extra_loss is not None:
                    extra, extra_items = self.extra_loss(preds, batch)
                    loss = loss + extra
                    items.update(extra_items)
                if self._dampened:
                    damp = weight_grid_distance(self._dampened) * dampening_weight(
                        self.cfg.qat_params.oscillation_dampening, ni / max(nb * self.qat_epochs, 1))
                    loss = loss + damp
                    items["dampening"] = damp.detach()
                # DDP averages gradients over ranks (so do average_gradients for the adapters): x world_size, as
                # Ultralytics does, on the whole sum so the extra term keeps its weight against the detection loss
                loss = loss * self.world_size
            finite = torch.isfinite(loss)
            if self._observers:  # the observers' flags join the step's one read of the loss
                finite = finite & ~nonfinite_observers(self._observers)
            items, finite = read_step_values(items, finite)
            if self.world_size > 1:  # every rank must take the same branch
                flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
                torch.distributed.all_reduce(flag)
                finite = float(flag) == 0
            if not finite:
                layers = take_nonfinite_names(self._observers) if self._observers else []
                raise _NonFinite(i, str(NonFiniteObservationError(layers[0])) if layers else "non-finite loss")
            self.scaler.scale(loss).backward()
            if (i + 1) % accumulate == 0 or i == nb - 1:
                if self.world_size > 1:
                    average_gradients(self._outside, self.world_size)
                self.scaler.unscale_(self.optimizer)
                # one norm over the model and the distillation adapters beside it (none: exactly as before)
                torch.nn.utils.clip_grad_norm_([*self.model.parameters(), *self._outside],
                                               max_norm=10.0)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(self.model)
                    refresh_weight_qparams(self.ema.ema)
                last_step = i
            for k, v in items.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix({k: f"{v / (i + 1):.3f}" for k, v in list(sums.items())[:3]})
        bar.close()
        if self._ema_observers and bool(nonfinite_observers(self._ema_observers)):
            layers = take_nonfinite_names(self._ema_observers)
            raise _NonFinite(last_step, f"the EMA's weights went non-finite ({str(NonFiniteObservationError(layers[0]))})")
        n = max(last_step + 1, 1)
        return {k: v / n for k, v in sums.items()}

    def _end_epoch(self, epoch: int, losses: dict) -> dict:
        tp = self.cfg.train_params
        metrics = {}
        if self.rank > 0:  # only the main process validates, logs and saves
            return metrics
        if self.validate_each_epoch:
            metrics = evaluate(self.eval_model, self.data_yaml, imgsz=tp.img_size, batch=tp.batch_size,
                               device=self.device, workers=0, save_dir=self.save_dir / "val")
        row = {"epoch": epoch + 1, **{f"train/{k}": round(v, 6) for k, v in losses.items()}}
        if metrics:
            row["metrics/mAP50(B)"] = metrics["map50"]
            row["metrics/mAP50-95(B)"] = metrics["map50_95"]
        for g in self.optimizer.param_groups:
            row[f"lr/{g.get('group', 'pg')}"] = g["lr"]
        self.state.history.append(row)
        self._write_csv()
        tb = self._tb()
        if tb is not None:
            for k, v in row.items():
                if k != "epoch":
                    tb.add_scalar(k, v, epoch + 1)
            for name, m in self.eval_model.named_modules():
                if isinstance(m, FakeQuantize):
                    tb.add_histogram(f"scales/{name}", m.calculate_qparams()[0].detach().float().cpu(), epoch + 1)
            tb.flush()
        LOGGER.info("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        return metrics

    def _write_csv(self) -> None:
        keys: list[str] = []
        for r in self.state.history:
            keys += [k for k in r if k not in keys]
        with open(self.save_dir / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.state.history)

    # ---------------------------------------------------------------------------------------------------------------
    def _snapshot(self) -> dict:
        return {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "outside": [p.detach().clone() for p in self._params_outside_model()],  # distillation adapters
            "ema": None if self.ema is None else {k: v.detach().clone() for k, v in self.ema.ema.state_dict().items()},
            "ema_updates": None if self.ema is None else self.ema.updates,
            "optimizer": _clone_state(self.optimizer.state_dict()),
            "scaler": _clone_state(self.scaler.state_dict()),
            "rng": rng_state(),
            "state": TrainState(self.state.epoch, self.state.best_fitness, list(self.state.history)),
        }

    def _restore(self, snap: dict) -> None:
        self.model.load_state_dict(snap["model"])
        outside = self._params_outside_model()
        assert len(outside) == len(snap["outside"]), "parameters joined the optimizer after the snapshot"
        with torch.no_grad():
            for p, v in zip(outside, snap["outside"]):
                p.copy_(v)
        if self.ema is not None:
            self.ema.ema.load_state_dict(snap["ema"])
            self.ema.updates = snap["ema_updates"]
        self.optimizer.load_state_dict(_clone_state(snap["optimizer"]))
        if snap["scaler"]:
            self.scaler.load_state_dict(snap["scaler"])
        set_rng_state(snap["rng"])
        st = snap["state"]
        self.state = TrainState(st.epoch, st.best_fitness, list(st.history))

    def training_state(self) -> dict:
        """Everything --resume needs, as tensors and plain data."""
        return {
            "epoch": self.state.epoch,
            "best_fitness": self.state.best_fitness,
            "history": self.state.history,
            "model": self.model.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
        }

    def load_training_state(self, st: dict) -> None:
        self.state = TrainState(int(st["epoch"]), float(st["best_fitness"]), list(st["history"]))
        self.model.load_state_dict(st["model"])
        if self.ema is not None and st.get("ema") is not None:
            self.ema.load_state_dict(st["ema"])
        self.optimizer.load_state_dict(st["optimizer"])
        if st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        # applied in train() once the dataloader exists: building Ultralytics' dataset draws random numbers, which the
        # uninterrupted run did before its first epoch, not before the resumed one
        self._resume_rng = st["rng"]

    def _checkpoint(self, model: nn.Module, train_state: bool) -> dict:
        extra = dict(self.checkpoint_extra)
        if train_state:
            extra["train_state"] = self.training_state()
        return qat_checkpoint(model, self.cfg, extra=extra)

    def _save_last(self) -> None:
        if self.rank > 0:
            return
        atomic_save(self._checkpoint(self.eval_model, True), self.weights_dir / "last.pt")

    def _save(self, metrics: dict) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()
        if self.rank > 0:
            return
        self._save_last()
        fit = fitness(metrics) if metrics else float(self.state.epoch)
        if fit >= self.state.best_fitness:
            self.state.best_fitness = fit
            atomic_save(self._checkpoint(self.eval_model, False), self.weights_dir / "best.pt")


def distributed_rank() -> int:
    """Global rank under torch.distributed, -1 when not distributed."""
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else -1


def distributed_world_size() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Average gradients over DDP ranks for parameters outside the DDP-wrapped model (distillation adapters).

    DDP averages only the gradients of the module it wraps; an adapter trained beside it would otherwise take each
    rank's own step and the ranks' adapters would drift apart. A missing gradient counts as zero, so every rank
    enters the same collectives.
    """
    if world_size <= 1:
        return
    for p in params:
        has_grad = torch.tensor([float(p.grad is not None)], device=p.device)
        torch.distributed.all_reduce(has_grad)
        if not has_grad.item():  # unused on every rank: leave it without a gradient, as a single process would
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad.div_(world_size)


def broadcast_parameters(params: list[nn.Parameter]) -> None:
    """Give every rank rank 0's values of parameters outside the DDP-wrapped model (DDP broadcasts only its own)."""
    for p in params:
        torch.distributed.broadcast(p.data, 0)


def _reseed_loader(loader, seed: int, epoch: int) -> None:
    """Restart the loader's iterator with its shuffle generator at ``seed`` (DDP samplers: at ``epoch``)."""
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(seed)
    if hasattr(getattr(loader, "sampler", None), "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if hasattr(loader, "reset"):
        loader.reset()


def read_step_values(items: dict, finite: torch.Tensor) -> tuple[dict[str, float], bool]:
    """The step's loss items (tensors or numbers) and its finite flag, read back to the host in one transfer: the
    training step's only host synchronisation."""
    names = list(items)
    parts = [torch.as_tensor(items[k], device=finite.device).detach().float().reshape(()) for k in names]
    values = torch.stack([*parts, finite.float().reshape(())]).tolist()
    return dict(zip(names, values[:-1])), values[-1] == 1.0


class _NonFinite(Exception):
    def __init__(self, step: int, what: str):
        super().__init__(what)
        self.step, self.what = step, what


def _clone_state(sd):
    if isinstance(sd, dict):
        return {k: _clone_state(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [_clone_state(v) for v in sd]
    if isinstance(sd, torch.Tensor):
        return sd.detach().clone()
    return sd
