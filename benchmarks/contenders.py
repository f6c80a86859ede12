"""The contenders of the comparison: what each one runs, whether it trains (and so is repeated per seed)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

# How a contender is produced (run_contender.py dispatches on it).
OURS = "ours"  # train_qat.py (calibration, and QAT unless --epochs 0)
ULTRA_TRAIN = "ultralytics_train"  # YOLO(fp32).train(...), optionally quantize=8 (ModelOpt QAT) and distill_model
ULTRA_PTQ = "ultralytics_ptq"  # YOLO(fp32).export(format="openvino", quantize=8) (NNCF post-training quantization)
NNCF_AC = "nncf_accuracy_control"  # nncf.quantize_with_accuracy_control on Ultralytics' FP32 IR
AIMET = "aimet"  # Qualcomm AIMET QuantSim (+ AdaRound, + QAT through Ultralytics' trainer): aimet_contenders.py

FP32_EVAL = "fp32_start"  # the user's FP32 model itself: evaluated and exported, not trained

# The float reference every step-time ratio is taken against.
FP32_REFERENCE = "fp32_finetuned"
# The model every accuracy is compared with ("vs start" column): the FP32 model the user brought.
START_REFERENCE = "fp32_start"


@dataclass(frozen=True)
class Contender:
    name: str
    family: str
    trains: bool  # runs the N training epochs, so it is repeated for every seed
    description: str
    cli: tuple[str, ...] = ()  # extra train_qat.py flags (OURS)
    ultralytics: dict = field(default_factory=dict)  # extra YOLO.train arguments (ULTRA_TRAIN)
    aimet: dict = field(default_factory=dict)  # param_bw, adaround, qat (AIMET)
    quick: bool = False  # part of --quick


CONTENDERS: tuple[Contender, ...] = (
    Contender(START_REFERENCE, FP32_EVAL, False, "the FP32 start model as it is (the reference of the vs-start "
              "column), its FP32 OpenVINO export", quick=True),
    Contender(FP32_REFERENCE, ULTRA_TRAIN, True, "FP32 trained N more epochs with the same recipe (float reference)",
              quick=True),
    Contender("ptq_ours", OURS, False, "calibration only, our placement (train_qat.py --epochs 0)", ("--epochs", "0"),
              quick=True),
    Contender("ptq_ours_adaround", OURS, False, "calibration and AdaRound learned rounding (train_qat.py --epochs 0 "
              "--adaround)", ("--epochs", "0", "--adaround")),
    Contender("ptq_ultralytics", ULTRA_PTQ, False, "Ultralytics OpenVINO export quantize=8 (NNCF PTQ), calibrated "
              "on the train split", quick=True),
    Contender("ptq_nncf_ac", NNCF_AC, False, "NNCF accuracy-controlled PTQ (max drop 0.2 points vs the FP32 IR), "
              "calibrated on the train split", quick=True),
    Contender("qat_ultralytics", ULTRA_TRAIN, True, "Ultralytics train quantize=8 (NVIDIA ModelOpt QAT), ONNX Q/DQ "
              "export run in OpenVINO", ultralytics={"quantize": 8}, quick=True),
    Contender("qat_ultralytics_kd", ULTRA_TRAIN, True, "as qat_ultralytics plus distill_model=<the FP32 model>",
              ultralytics={"quantize": 8, "distill": True}),
    Contender("qat_ours", OURS, True, "our QAT, default preset", quick=True),
    Contender("qat_ours_sensitive", OURS, True, "our QAT, sensitive preset (histogram ranges, LSQ)",
              ("--qconfig", "sensitive")),
    Contender("qat_ours_kd", OURS, True, "our QAT with knowledge distillation from the FP32 model",
              ("--distillation",)),
    Contender("ptq_ours_w4a8", OURS, False, "calibration only, 4-bit weights / 8-bit activations",
              ("--qconfig", "w4a8", "--epochs", "0")),
    Contender("ptq_ours_w4a8_adaround", OURS, False, "calibration and AdaRound, 4-bit weights / 8-bit activations",
              ("--qconfig", "w4a8", "--epochs", "0", "--adaround")),
    Contender("qat_ours_w4a8", OURS, True, "our QAT, 4-bit weights / 8-bit activations", ("--qconfig", "w4a8")),
    Contender("qat_ours_w4a8_adaround", OURS, True, "our QAT w4a8 starting from AdaRound weights",
              ("--qconfig", "w4a8", "--adaround")),
    Contender("qat_ours_w4a8_dampening", OURS, True, "our QAT w4a8 with oscillation dampening (lambda 1e-4)",
              ("--qconfig", "w4a8", "--oscillation-dampening", "1e-4")),
    Contender("qat_ours_w4a8_kd", OURS, True, "our QAT w4a8 with knowledge distillation",
              ("--qconfig", "w4a8", "--distillation")),
    Contender("ptq_aimet_adaround", AIMET, False, "AIMET AdaRound PTQ, 8-bit weights / 8-bit activations",
              aimet={"param_bw": 8, "adaround": True}),
    Contender("ptq_aimet_w4a8_adaround", AIMET, False, "AIMET AdaRound PTQ, 4-bit weights / 8-bit activations",
              aimet={"param_bw": 4, "adaround": True}),
    Contender("qat_aimet_w4a8", AIMET, True, "AIMET QuantSim QAT (range learning), 4-bit weights / 8-bit "
              "activations, trained by Ultralytics' trainer", aimet={"param_bw": 4, "qat": True}),
    Contender("qat_ours_mixed", OURS, True, "our QAT with sensitivity-driven per-layer bit widths",
              ("--mixed-precision",)),
)

BY_NAME = {c.name: c for c in CONTENDERS}


def select(only: str | None, quick: bool) -> list[Contender]:
    """The contenders to run, in table order: ``--only a,b`` (any of them, even outside --quick), else all / quick.

    Raises:
        ValueError: An unknown name in ``only`` (the message suggests the nearest one).
    """
    if not only:
        return [c for c in CONTENDERS if c.quick or not quick]
    names = [n.strip() for n in only.split(",") if n.strip()]
    for n in names:
        if n not in BY_NAME:
            close = difflib.get_close_matches(n, BY_NAME, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"--only: unknown contender {n!r}{hint} Known: {', '.join(BY_NAME)}")
    return [c for c in CONTENDERS if c.name in names]


def seeds_for(c: Contender, seeds: list[int]) -> list[int]:
    """Training contenders run once per seed; calibration-only ones (deterministic given the data) run once."""
    return list(seeds) if c.trains else list(seeds[:1])
