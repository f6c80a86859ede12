"""Knowledge distillation for QAT: a frozen float teacher guides the fake-quantized student.

Terms (each logged; all are exactly zero when student and teacher produce identical raw outputs). Neither output term
changes scale with the number of classes, anchors or images, and the T^2 factor (Hinton et al., 2015) keeps their
gradients comparable across temperatures:
  * ``kd_cls``: binary KL(teacher || student) between sigmoid class scores at temperature T (Ultralytics' classifier
    is per-class sigmoid, not softmax), summed and divided by the teacher's score mass at T = 1 (at least 1), times
    T^2 -- the normalisation v8DetectionLoss gives its class BCE (by the target score mass), so ``kd_weight`` weighs
    it against the detection loss alike on every dataset.
  * ``kd_box``: KL(teacher || student) between the DFL box distributions (softmax over ``reg_max`` bins per side) at
    temperature T, averaged over the 4 sides, then over (image, anchor) weighted by the teacher's confidence
    (weights normalised to sum 1: box distributions of background anchors carry no signal), times T^2.
  * ``kd_feat``: MSE between student and teacher feature maps (the neck outputs that feed Detect, or
    ``distillation.feature_layers``), through a trainable 1x1 conv adapter where the channel counts differ; a mean
    over elements, then over levels.

The teacher lives in a plain attribute of :class:`Distiller` (not a registered submodule of anything the trainer
touches), its parameters have ``requires_grad=False`` and it runs under ``torch.no_grad()`` in eval mode, so neither
the optimizer, ``model.train()``, EMA nor checkpoints ever see it.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

from src.data.resolve import load_fp32_model, load_fp32_source, resolve_model_path
from src.errors import QATError

LOGGER = logging.getLogger("yolov8_qat")


class DistillationError(QATError):
    """The teacher cannot guide this student (class set, architecture or feature shapes differ)."""


# --------------------------------------------------------------------------------------------------------------------
# Loss terms: pure functions of the raw head outputs
# --------------------------------------------------------------------------------------------------------------------
def _raw(preds) -> dict:
    """The raw head dict from a Detect output (training: the dict; eval: ``(decoded, dict)``)."""
    if isinstance(preds, (tuple, list)):
        preds = preds[1]
    if isinstance(preds, dict) and "one2one" in preds:
        raise DistillationError("distillation of end-to-end heads (YOLO26: one-to-many and one-to-one branches, no "
                                "DFL) is not supported yet; run without --distillation")
    if not isinstance(preds, dict) or "scores" not in preds or "boxes" not in preds:
        raise DistillationError("distillation needs the Detect head's raw outputs {'boxes', 'scores', 'feats'}; "
                                "got " + type(preds).__name__)
    return preds


def class_kd(student_scores: torch.Tensor, teacher_scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Binary KL(teacher || student) of sigmoid class scores at temperature T, per unit of teacher score mass, x T^2.

    ``sum_{b,c,a} KL(Bernoulli(sigmoid(t/T)) || Bernoulli(sigmoid(s/T))) / max(sum_{b,c,a} sigmoid(t), 1) * T^2``:
    the mass is taken at T = 1, so the normaliser does not move with the temperature, and it grows with the classes,
    anchors and images exactly as the sum does (v8DetectionLoss divides its class BCE by the target score mass the
    same way; the floor keeps a batch without objects from dividing by ~0).

    Args:
        student_scores: Logits (B, nc, A).
        teacher_scores: Logits (B, nc, A).
        temperature: T > 0; logits are divided by it before the sigmoid.
    """
    s = student_scores.float() / temperature
    t = teacher_scores.float() / temperature
    p = torch.sigmoid(t)
    # written as differences of log-sigmoids so that identical logits give exactly 0
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    mass = torch.sigmoid(teacher_scores.float()).sum().clamp(min=1.0)
    return kl.sum() / mass * temperature ** 2


def box_kd(student_boxes: torch.Tensor, teacher_boxes: torch.Tensor, teacher_scores: torch.Tensor,
           temperature: float, reg_max: int) -> torch.Tensor:
    """KL(teacher || student) of the DFL distributions at T, mean per anchor side, confidence-weighted mean, x T^2.

    ``sum_{b,a} w_ba * mean_side KL(softmax(t/T) || softmax(s/T)) / sum_{b,a} w_ba * T^2`` with ``w_ba`` the
    teacher's highest class probability at the anchor: a weighted mean, so repeating the anchors (or classes) leaves
    it unchanged.

    Args:
        student_boxes: Raw DFL logits (B, 4 * reg_max, A).
        teacher_boxes: Raw DFL logits (B, 4 * reg_max, A).
        teacher_scores: Teacher class logits (B, nc, A); the per-anchor weight is max_c sigmoid (at T = 1).
        temperature: T > 0.
        reg_max: DFL bins per box side.
    """
    b, _, a = student_boxes.shape
    s = student_boxes.float().view(b, 4, reg_max, a) / temperature
    t = teacher_boxes.float().view(b, 4, reg_max, a) / temperature
    log_ps, log_pt = F.log_softmax(s, dim=2), F.log_softmax(t, dim=2)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=2).mean(dim=1)  # (B, A): mean over the 4 sides
    w = torch.sigmoid(teacher_scores.float()).amax(dim=1)  # (B, A)
    # the floor only matters when every weight underflowed to 0 (no anchor with any signal): then the term is 0
    return (w * kl).sum() / w.sum().clamp(min=torch.finfo(w.dtype).tiny) * temperature ** 2


def feature_kd(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor],
               adapters: nn.ModuleList) -> torch.Tensor:
    """Mean over levels of MSE(adapter(student), teacher); an ``nn.Identity`` adapter where widths match."""
    total = student_feats[0].new_zeros((), dtype=torch.float32)
    for s, t, adapt in zip(student_feats, teacher_feats, adapters):
        total = total + F.mse_loss(adapt(s.float()), t.float())
    return total / max(len(student_feats), 1)


# --------------------------------------------------------------------------------------------------------------------
# Teacher
# --------------------------------------------------------------------------------------------------------------------
def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Eval mode, no gradients, and ``train()`` made a no-op so nothing can switch it back to training."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.train = lambda mode=True: teacher  # BN statistics and Detect's inference path stay fixed
    return teacher


def build_teacher(cfg, fp32_model: nn.Module | None, data: dict, *, trusted: bool = False) -> nn.Module:
    """The frozen teacher: ``distillation.teacher_model`` if set, else a copy of the FP32 source model.

    Args:
        cfg: Resolved QATConfig.
        fp32_model: The float model QAT started from (None when unknown, e.g. a QAT checkpoint without source).
        data: Checked data dict; the teacher must predict exactly its classes.
        trusted: ``--trust-checkpoint``: unpickle the teacher checkpoint fully (see ``load_fp32_model``).

    Raises:
        DistillationError: No teacher available, or its classes differ from the dataset's.
    """
    source = cfg.distillation.teacher_model
    if source:
        resolved = resolve_model_path(source, cfg.model.variant)
        if resolved.kind == "qat_checkpoint":
            raise DistillationError(f"--teacher-model {source} is a QAT checkpoint; the teacher must be a float "
                                    "Ultralytics detection checkpoint (e.g. yolov8m.pt trained on this dataset)")
        teacher = load_fp32_model(resolved, nc=int(data["nc"]) if resolved.kind == "yaml" else None, trusted=trusted)
        if resolved.kind == "yaml":
            teacher.names = dict(data["names"])
            LOGGER.warning(f"teacher {source} is a model YAML: randomly initialised, so it teaches nothing useful")
        desc = f"--teacher-model {source}"
    else:
        if fp32_model is None:
            raise DistillationError(
                "self-distillation needs the FP32 source model, which this QAT checkpoint does not name "
                "(fp32_source) or which is not at hand; pass --teacher-model <fp32 checkpoint trained on this "
                "dataset>")
        # the student's own source: its class set was checked when QAT started (a YAML model has generic names)
        return freeze_teacher(copy.deepcopy(fp32_model).float())
    check_teacher_classes(teacher, data, desc)
    return freeze_teacher(teacher.float())


def check_teacher_classes(teacher: nn.Module, data: dict, desc: str) -> None:
    """The teacher predicts the dataset's class set (same count and names, in the same order)."""
    nc = int(teacher.yaml.get("nc", len(getattr(teacher, "names", {}) or {})))
    if nc != int(data["nc"]):
        raise DistillationError(
            f"{desc} predicts {nc} classes but the dataset has {data['nc']}; distillation needs a teacher trained "
            "on the same classes (fine-tune it first: `yolo train model=<teacher.pt> data=<data.yaml>`)")
    names = {int(k): str(v) for k, v in (getattr(teacher, "names", None) or {}).items()}
    want = {int(k): str(v) for k, v in dict(data["names"]).items()}
    if names and names != want:
        diff = [f"{k}: {names.get(k)!r} vs {want.get(k)!r}" for k in sorted(want) if names.get(k) != want.get(k)]
        raise DistillationError(
            f"{desc} has other class names than the dataset ({'; '.join(diff[:5])}); distillation needs a teacher "
            "trained on the same classes in the same order")


# --------------------------------------------------------------------------------------------------------------------
# The extra_loss callable the trainer takes
# --------------------------------------------------------------------------------------------------------------------
class _LayerOutputs:
    """Forward hooks that keep the latest output of selected top-level layers."""

    def __init__(self, model: nn.Module, indices: list[int]):
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = []
        layers = model.model
        for i in indices:
            if not 0 <= i < len(layers):
                raise DistillationError(f"distillation.feature_layers: {i} is not a layer index of this model "
                                        f"(0..{len(layers) - 1}); use e.g. the neck outputs [15, 18, 21]")
            self.handles.append(layers[i].register_forward_hook(
                lambda mod, inp, out, i=i: self.outputs.__setitem__(i, out)))

    def get(self, indices: list[int]) -> list[torch.Tensor]:
        return [self.outputs[i] for i in indices]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class Distiller:
    """``extra_loss(preds, batch) -> (loss, {term: value})`` for :class:`~src.training.trainer.QATTrainer`.

    Args:
        teacher: Frozen teacher (see :func:`build_teacher`).
        student: The model being trained (used once to size the feature adapters, and for feature hooks).
        dcfg: ``cfg.distillation``.
        device: Where teacher and adapters run.
        imgsz: Image size of the probe forward that sizes the adapters.

    The adapters (1x1 convs where student and teacher widths differ) are trainable: add :meth:`parameters` to the
    optimizer (``train_stage`` adds them as the param group ``distill``).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, dcfg, device: torch.device, imgsz: int = 64):
        self.teacher = teacher.to(device)
        self.T, self.kd_weight, self.feature_weight = dcfg.temperature, dcfg.kd_weight, dcfg.feature_weight
        self.feature_layers = list(dcfg.feature_layers)
        s_head, t_head = student.model[-1], teacher.model[-1]
        if s_head.reg_max != t_head.reg_max:
            raise DistillationError(f"teacher reg_max {t_head.reg_max} differs from the student's {s_head.reg_max}; "
                                    "box distributions cannot be compared")
        self.reg_max = s_head.reg_max
        self.adapters = nn.ModuleList()
        self._student_hooks = self._teacher_hooks = None
        if self.feature_weight > 0:
            if self.feature_layers:
                self._student_hooks = _LayerOutputs(student, self.feature_layers)
                self._teacher_hooks = _LayerOutputs(self.teacher, self.feature_layers)
            self.adapters = self._build_adapters(student, device, imgsz)
        self.adapters.to(device)

    def _features(self, raw: dict, hooks: _LayerOutputs | None) -> list[torch.Tensor]:
        return list(raw["feats"]) if hooks is None else hooks.get(self.feature_layers)

    def _build_adapters(self, student: nn.Module, device, imgsz: int) -> nn.ModuleList:
        p = next(student.parameters())
        x = torch.zeros(1, 3, imgsz, imgsz, device=device, dtype=p.dtype)
        was = student.training
        student.eval()  # eval mode: no observer updates, no BN statistics change
        try:
            with torch.no_grad():
                s_feats = self._features(_raw(student(x)), self._student_hooks)
                t_feats = self._features(_raw(self.teacher(x)), self._teacher_hooks)
        finally:
            student.train(was)
        adapters = nn.ModuleList()
        for i, (s, t) in enumerate(zip(s_feats, t_feats)):
            if s.shape[2:] != t.shape[2:]:
                raise DistillationError(f"feature level {i}: student map {tuple(s.shape[2:])} vs teacher "
                                        f"{tuple(t.shape[2:])}; choose distillation.feature_layers with equal strides")
            if s.shape[1] == t.shape[1]:
                adapters.append(nn.Identity())
            else:
                adapters.append(nn.Conv2d(s.shape[1], t.shape[1], 1))
        return adapters

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the feature adapters (empty when widths match or feature distillation is off)."""
        return list(self.adapters.parameters())

    def state_dict(self) -> dict:
        """Adapter weights (live tensors: they follow the optimizer's in-place updates)."""
        return dict(self.adapters.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.adapters.load_state_dict(state)

    def __call__(self, preds, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student = _raw(preds)
        with torch.no_grad():
            teacher = _raw(self.teacher(batch["img"]))
        bs = student["scores"].shape[0]
        l_cls = class_kd(student["scores"], teacher["scores"], self.T)
        l_box = box_kd(student["boxes"], teacher["boxes"], teacher["scores"], self.T, self.reg_max)
        loss = self.kd_weight * (l_cls + l_box)
        # tensors: the trainer reads every loss item in the step's one host transfer
        items = {"kd_cls": l_cls.detach(), "kd_box": l_box.detach()}
        if self.feature_weight > 0:
            l_feat = feature_kd(self._features(student, self._student_hooks),
                                self._features(teacher, self._teacher_hooks), self.adapters)
            loss = loss + self.feature_weight * l_feat
            items["kd_feat"] = l_feat.detach()
        # v8DetectionLoss returns its per-image loss x batch size; match that scale so the weights compare directly
        return loss * bs, items

    def close(self) -> None:
        for h in (self._student_hooks, self._teacher_hooks):
            if h is not None:
                h.remove()


def attach_distiller(trainer, cfg, fp32_model: nn.Module | None, data: dict, *, trusted: bool = False) -> Distiller:
    """Build the teacher and :class:`Distiller` and wire them into a constructed ``QATTrainer``.

    The trainer gets the distiller as its ``extra_loss``; the adapters join its optimizer as param group
    ``distill`` (lr = train_params.lr, no weight decay) and its checkpoints as ``distill_adapters`` (so --resume
    restores them; call this before ``load_training_state`` so the optimizer groups line up).

    Args:
        trainer: A ``QATTrainer`` whose ``checkpoint_extra`` may hold ``fp32_source`` and ``distill_adapters``
            (from a checkpoint being resumed).
        cfg: Resolved QATConfig.
        fp32_model: The float source model; None loads ``checkpoint_extra["fp32_source"]`` when the teacher is the
            source model.
        data: Checked data dict.
        trusted: As for :func:`build_teacher`.
    """
    extra = trainer.checkpoint_extra
    if fp32_model is None and not cfg.distillation.teacher_model:
        fp32_model = load_fp32_source(extra.get("fp32_source"), cfg.model.variant, trusted=trusted)
    teacher = build_teacher(cfg, fp32_model, data, trusted=trusted)
    distiller = Distiller(teacher, trainer.model, cfg.distillation, trainer.device, imgsz=cfg.train_params.img_size)
    if extra.get("distill_adapters"):
        distiller.load_state_dict(extra["distill_adapters"])
    params = distiller.parameters()
    if params:
        lr = cfg.train_params.lr
        trainer.optimizer.add_param_group({"params": params, "weight_decay": 0.0, "group": "distill", "lr": lr,
                                           "initial_lr": lr})
        extra["distill_adapters"] = distiller.state_dict()
    trainer.extra_loss = distiller
    n_adapt = sum(isinstance(a, nn.Conv2d) for a in distiller.adapters)
    LOGGER.info(f"Distillation from {cfg.distillation.teacher_model or 'the FP32 source model'}: "
                f"T={distiller.T:g}, kd_weight={distiller.kd_weight:g}, feature_weight={distiller.feature_weight:g}"
                + (f", {n_adapt} 1x1 adapters ({sum(p.numel() for p in params)} params)" if n_adapt else ""))
    return distiller
