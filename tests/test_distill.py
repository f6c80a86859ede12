"""Knowledge distillation: loss terms, frozen teacher, trainable adapters, class-set checks."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from src.config import load_config
from src.models.yolov8_qat import prepare_qat_model
from src.training.distill import (
    DistillationError,
    Distiller,
    attach_distiller,
    box_kd,
    build_teacher,
    class_kd,
    freeze_teacher,
)


def _model(yaml="yolov8n.yaml", seed=0):
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    m = DetectionModel(yaml, nc=3, verbose=False)
    m.names = {0: "circle", 1: "square", 2: "triangle"}
    return m


DATA = {"nc": 3, "names": {0: "circle", 1: "square", 2: "triangle"}}


def _cfg(**dist):
    cfg = load_config(None, {"train_params.img_size": 64, "train_params.batch_size": 4, "train_params.device": "cpu",
                             "train_params.workers": 0, "qat_params.use_distillation": True,
                             **{f"distillation.{k}": v for k, v in dist.items()}})
    return cfg


def _bernoulli_kl(pt: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
    return pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_class_kd_is_the_binary_kl_per_teacher_score_mass_at_t1(T):
    """Documented scale: sum of KL(sigmoid(t/T) || sigmoid(s/T)) / max(sum sigmoid(t), 1), x T^2; 0 when equal."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 10) * 3, torch.randn(2, 3, 10) * 3 - 4  # a mostly-background teacher, as in detection
    mass = torch.sigmoid(t.double()).sum()
    assert mass > 1  # the normaliser, not its floor
    ref = _bernoulli_kl(torch.sigmoid(t.double() / T), torch.sigmoid(s.double() / T)).sum() / mass * T * T
    assert math.isclose(float(class_kd(s, t, T)), float(ref), rel_tol=1e-5)
    assert float(class_kd(t, t, T)) == 0.0


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_box_kd_is_the_confidence_weighted_mean_side_kl_times_t_squared(T):
    torch.manual_seed(1)
    reg_max = 16
    s, t = torch.randn(2, 4 * reg_max, 7), torch.randn(2, 4 * reg_max, 7)
    scores = torch.randn(2, 3, 7) - 6  # background-dominated: total weight < 1
    ps = F.softmax(s.double().view(2, 4, reg_max, 7) / T, 2)
    pt = F.softmax(t.double().view(2, 4, reg_max, 7) / T, 2)
    kl = (pt * (pt.log() - ps.log())).sum(2).mean(1)  # (B, A)
    w = torch.sigmoid(scores.double()).amax(1)
    ref = (w * kl).sum() / w.sum() * T * T
    assert math.isclose(float(box_kd(s, t, scores, T, reg_max)), float(ref), rel_tol=1e-5)
    assert float(box_kd(t, t, scores, T, reg_max)) == 0.0


@pytest.mark.parametrize("axis", ["classes", "anchors", "images"])
def test_kd_terms_do_not_depend_on_the_number_of_classes_anchors_or_images(axis):
    """The same per-anchor logits repeated twice along an axis give the same KD: kd_weight means the same whatever
    the dataset's class count or the image size."""
    torch.manual_seed(2)
    reg_max, T = 16, 2.0
    s_cls, t_cls = torch.randn(1, 3, 21) - 8, torch.randn(1, 3, 21) - 10
    t_cls[0, 1, 5:8] = 6.0  # one object: the teacher's score mass (the normaliser) is above its floor of 1
    s_box, t_box = torch.randn(1, 4 * reg_max, 21), torch.randn(1, 4 * reg_max, 21)
    dim = {"classes": 1, "anchors": 2, "images": 0}[axis]

    def twice(x: torch.Tensor, boxes: bool = False) -> torch.Tensor:
        return x if boxes and axis == "classes" else torch.cat([x, x], dim=dim)

    assert math.isclose(float(class_kd(twice(s_cls), twice(t_cls), T)), float(class_kd(s_cls, t_cls, T)),
                        rel_tol=1e-6)
    one = box_kd(s_box, t_box, t_cls, T, reg_max)
    two = box_kd(twice(s_box, True), twice(t_box, True), twice(t_cls), T, reg_max)
    assert math.isclose(float(two), float(one), rel_tol=1e-6)


def test_kd_loss_zero_for_identical_student_positive_otherwise():
    teacher = freeze_teacher(_model())
    student = copy.deepcopy(teacher)
    student.train = type(teacher).train.__get__(student)  # the copy must behave like a normal model again
    cfg = _cfg(feature_weight=1.0)
    d = Distiller(teacher, student, cfg.distillation, torch.device("cpu"))
    x = torch.rand(2, 3, 64, 64)
    student.eval()  # same BN path as the teacher, so the raw outputs are identical
    loss, items = d(student(x), {"img": x})
    assert float(loss) == 0.0 and items == {"kd_cls": 0.0, "kd_box": 0.0, "kd_feat": 0.0}
    with torch.no_grad():
        # random-init activations are tiny in eval mode, so perturb the output biases directly
        student.model[-1].cv3[0][2].bias.add_(0.5)  # class logits of level 0
    loss, items = d(student(x), {"img": x})
    assert items["kd_cls"] > 0 and float(loss) > 0
    with torch.no_grad():
        student.model[-1].cv2[0][2].bias[::3].add_(0.5)  # some DFL bins of level 0
    loss, items = d(student(x), {"img": x})
    assert items["kd_box"] > 0
    assert items["kd_feat"] == 0.0  # neck untouched


def test_teacher_frozen_adapters_trained_in_a_real_training_step(tiny_dataset, tmp_path):
    from src.data.resolve import resolve_data
    from src.training.trainer import QATTrainer

    cfg = _cfg(teacher_model="yolov8s.yaml", feature_weight=1.0, kd_weight=1.0)
    cfg.train_params.batch_size = 8  # the 8 training images in one step
    data = resolve_data(str(tiny_dataset))
    student = _model()
    prepare_qat_model(student, cfg)
    trainer = QATTrainer(student, cfg, data, str(tiny_dataset), torch.device("cpu"), tmp_path, None,
                         validate_each_epoch=False, checkpoint_extra={"stage": "qat"})
    d = attach_distiller(trainer, cfg, None, data)
    teacher = d.teacher
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    # yolov8s is wider than yolov8n: one 1x1 adapter per neck output, in the optimizer
    adapters = [a for a in d.adapters if isinstance(a, torch.nn.Conv2d)]
    assert len(adapters) == 3
    assert [g["group"] for g in trainer.optimizer.param_groups][-1] == "distill"
    assert {id(p) for p in trainer.optimizer.param_groups[-1]["params"]} == {id(p) for p in d.parameters()}
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    a_before = [p.detach().clone() for p in d.parameters()]
    student.train()
    assert not teacher.training
    trainer.cfg.train_params.epochs = 1
    trainer.qat_epochs = trainer.total_epochs = 1
    trainer.train()
    assert not teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_before.items())
    assert any(not torch.equal(a, p) for a, p in zip(a_before, d.parameters()))
    # the logged terms reach results.csv
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert "train/kd_cls" in header and "train/kd_box" in header and "train/kd_feat" in header
    # adapter weights travel with the checkpoint (live tensors), so --resume restores them
    ckpt = torch.load(tmp_path / "weights" / "last.pt", weights_only=True)
    assert all(torch.equal(ckpt["distill_adapters"][k], v) for k, v in d.state_dict().items())
    # the adapters are what DDP does not average and what a rollback (non-finite loss, Ctrl-C) must restore too
    assert {id(p) for p in trainer._params_outside_model()} == {id(p) for p in d.parameters()}
    snap = trainer._snapshot()
    saved = [p.detach().clone() for p in d.parameters()]
    with torch.no_grad():
        for p in d.parameters():
            p.add_(1.0)
    trainer._restore(snap)
    assert all(torch.equal(a, p) for a, p in zip(saved, d.parameters()))


def test_teacher_with_other_classes_is_refused(tmp_path):
    other = _model()
    other.names = {0: "cat", 1: "dog", 2: "bird"}
    path = tmp_path / "other.pt"
    torch.save({"model": other, "train_args": {}}, path)  # an Ultralytics-style checkpoint
    with pytest.raises(DistillationError, match="other class names than the dataset .0: 'cat' vs 'circle'"):
        build_teacher(_cfg(teacher_model=str(path)), None, DATA)
    with pytest.raises(DistillationError, match="predicts 3 classes but the dataset has 5"):
        build_teacher(_cfg(teacher_model=str(path)), None, {"nc": 5, "names": {i: str(i) for i in range(5)}})
    with pytest.raises(DistillationError, match="--teacher-model"):
        build_teacher(_cfg(), None, DATA)
    # same classes: accepted, frozen
    other.names = dict(DATA["names"])
    torch.save({"model": other, "train_args": {}}, path)
    t = build_teacher(_cfg(teacher_model=str(path)), None, DATA)
    assert not t.training and not any(p.requires_grad for p in t.parameters())


def test_cli_distillation_with_mixed_precision(tiny_dataset, tmp_path):
    """`train_qat.py --distillation --mixed-precision` trains the chosen bit widths with the KD terms logged."""
    from src.cli import main
    from src.models.yolov8_qat import build_from_checkpoint

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"mixed_precision:\n  sensitivity_images: 2\n  measure_pareto: false\n  cache_dir: {tmp_path}/c\n"
                   "qat_params:\n  calibration_images: 4\n  calibration_batch_size: 4\n  skip_detection_head: true\n")
    run = tmp_path / "run"
    assert main(["--model", "yolov8n.yaml", "--data", str(tiny_dataset), "--config", str(cfg), "--img-size", "64",
                 "--batch-size", "8", "--device", "cpu", "--workers", "0", "--epochs", "1", "--save-dir", str(run),
                 "--log-dir", str(tmp_path / "logs"), "--distillation", "--mixed-precision"]) == 0
    assignment = json.loads((run / "mixed_precision" / "assignment.json").read_text())
    assert assignment["assignment"]["avg_bits"] <= 6.0
    model, _ = build_from_checkpoint(torch.load(run / "quantized_model.pt", weights_only=True))
    assert model.qat_placement.bit_overrides == assignment["bit_overrides"]
    bits = {l.name: l.weight_bits for l in model.qat_placement.layers if l.quantized}
    assert bits == {k: v for k, v in assignment["assignment"]["weight_bits"].items()}
    rows = {line.split()[0]: line.split() for line in (run / "placement.txt").read_text().splitlines() if line}
    assert 4 in bits.values() and all(rows[n][3] == str(b) for n, b in bits.items())  # the placement's w column
    header = (run / "results.csv").read_text().splitlines()[0]
    assert "train/kd_cls" in header and "train/kd_box" in header
