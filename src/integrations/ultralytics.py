"""Ultralytics 8.4.190 internals this toolkit relies on (contract-tested in tests/test_integrations.py).

Ultralytics reads its environment once, at import, so it is imported inside these functions: whatever imports this
module must not pull Ultralytics in before ``src.env.prepare_environment()`` has run.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from types import ModuleType
from typing import Any, NamedTuple

from torch import nn

# Set on every top-level layer by ``parse_model`` and read by ``BaseModel._predict_once`` (``f``: where the input
# comes from, ``i``: layer index, whether its output is saved); a module swapped in for a layer must carry them.
LAYER_ATTRS = ("f", "i", "type", "np")


class BlockModules(NamedTuple):
    """Ultralytics' modules holding the YOLOv8 building blocks."""

    conv: ModuleType  # Conv, DWConv, Concat and the unsupported conv variants
    block: ModuleType  # Bottleneck, C2f, SPPF, DFL
    head: ModuleType  # Detect


@functools.cache
def block_modules() -> BlockModules:
    """Ultralytics' block modules, imported on first use."""
    # deferred: Ultralytics must be imported after src.env.prepare_environment()
    from ultralytics.nn.modules import block, conv, head

    return BlockModules(conv, block, head)


def carry_layer_attrs(old: nn.Module, new: nn.Module) -> None:
    """Copy the ``parse_model`` layer attributes of ``old`` onto ``new`` (those ``new`` lacks)."""
    for a in LAYER_ATTRS:
        if hasattr(old, a) and not hasattr(new, a):
            setattr(new, a, getattr(old, a))


def conv_block_bn(block: nn.Module) -> nn.BatchNorm2d | None:
    """The BatchNorm of a ``Conv``/``DWConv`` block; None once Ultralytics' ``fuse()`` has folded and deleted it."""
    return getattr(block, "bn", None)


def rebuild_conv_block(source: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: nn.Module) -> nn.Module:
    """An Ultralytics ``Conv`` (or ``DWConv`` for ``source="DWConv"``) made of the given modules.

    ``__init__`` is skipped: it would allocate new weights; the block's forward uses exactly ``conv``, ``bn`` and
    ``act``, registered in its own order.
    """
    conv_mod = block_modules().conv
    cls = conv_mod.DWConv if source == "DWConv" else conv_mod.Conv
    block = cls.__new__(cls)
    nn.Module.__init__(block)
    block.conv, block.bn = conv, bn
    block.act = act
    return block


def rebuild_bottleneck(cv1: nn.Module, cv2: nn.Module, add: bool) -> nn.Module:
    """An Ultralytics ``Bottleneck`` made of the given convs (``__init__`` skipped as in :func:`rebuild_conv_block`)."""
    cls = block_modules().block.Bottleneck
    b = cls.__new__(cls)
    nn.Module.__init__(b)
    b.cv1, b.cv2, b.add = cv1, cv2, add
    return b


def model_task(model_or_yaml) -> str:
    """Ultralytics' task of a model or model YAML dict, from its head: detect, segment, pose, obb, ..."""
    from ultralytics.nn.tasks import guess_model_task  # deferred: Ultralytics is imported after prepare_environment()

    return guess_model_task(model_or_yaml)


def task_model_class(task: str) -> type:
    """The Ultralytics model class that builds a model YAML of ``task`` (its loss, and what its head needs, e.g.
    ``kpt_shape``)."""
    from ultralytics.nn import tasks  # deferred: as above

    classes = {"detect": tasks.DetectionModel, "segment": tasks.SegmentationModel, "pose": tasks.PoseModel}
    if task not in classes:
        raise ValueError(f"no model class for task {task!r}; supported: {', '.join(classes)}")
    return classes[task]


def has_one2one_head(detect: nn.Module) -> bool:
    """Whether a ``Detect`` head carries the end-to-end (NMS-free) one-to-one branch."""
    return getattr(detect, "one2one_cv2", None) is not None


def inactive_head_branches(detect: nn.Module) -> tuple[str, ...]:
    """Attribute names of the ``Detect`` branches an inference forward does not read: an end-to-end head's
    one-to-one branch unless ``end2end`` selects it (Ultralytics' default: one-to-many outputs, NMS outside), else its
    one-to-many branch; none for a single-branch head. ``Detect.fuse()`` deletes exactly these."""
    if not has_one2one_head(detect):
        return ()
    branches = ("cv2", "cv3", "cv4") if getattr(detect, "one2one_cv4", None) is not None else ("cv2", "cv3")
    return branches if detect.end2end else tuple(f"one2one_{b}" for b in branches)


def select_end2end(model: nn.Module, on: bool) -> bool:
    """Select the inference branch of ``model``'s end-to-end head: one-to-one, NMS-free (``on``) or one-to-many with
    NMS outside (Ultralytics' default, ``nms=None``); returns whether the model has such a head (nothing to select
    otherwise)."""
    detect = getattr(model, "model", [None])[-1]
    if detect is None or not has_one2one_head(detect):
        return False
    detect.end2end = on
    return True


def validator_nms(model: nn.Module) -> bool | None:
    """The ``nms`` argument under which Ultralytics' validator keeps ``model``'s inference branch (``nms=False``
    selects an end-to-end head's one-to-one branch, ``None`` the one-to-many one)."""
    return False if getattr(model, "end2end", False) else None


def set_loss_epoch(model: nn.Module, epoch: int) -> None:
    """Put ``model``'s criterion in the state Ultralytics' trainer gives it at the start of ``epoch`` (0-based).

    An end-to-end head's ``E2ELoss`` moves weight from its one-to-many to its one-to-one term as epochs pass
    (``update()`` after each epoch, over ``model.args.epochs``); set from the epoch index, as Ultralytics' resume does,
    so a resumed or rolled-back epoch gets the same weights. Other criteria have no schedule.
    """
    criterion = getattr(model, "criterion", None)
    if criterion is None:
        criterion = model.criterion = model.init_criterion()
    if hasattr(criterion, "update") and hasattr(criterion, "updates"):
        criterion.updates = epoch - 1
        criterion.update()


def set_model_args(model: nn.Module, args: Any) -> None:
    """Set ``model.args``, where Ultralytics looks for a model's hyperparameters.

    ``v8DetectionLoss`` reads its box/cls/dfl gains from it (as attributes) when ``model.loss`` first builds the
    criterion; Ultralytics' own checkpoints carry it as a dict of training arguments.
    """
    model.args = args


def normalize_coords_wrapper(model: nn.Module, height: int, width: int, nc: int) -> nn.Module:
    """The wrapper Ultralytics' LiteRT export puts around a Detect model: box coordinates relative to the image size.

    ``LiteRTBackend`` multiplies them back by the image size, so a TFLite file must carry the same convention.
    """
    from ultralytics.utils.export.engine import _NormalizeCoords  # private; deferred: loads the exporter

    return _NormalizeCoords(model, height, width, "detect", int(nc), None).eval()


def load_detection_checkpoint(path, *, trusted: bool = False) -> nn.Module:
    """The float model of an Ultralytics checkpoint file, through Ultralytics' own ``load_checkpoint``.

    Unless ``trusted``, the file is unpickled by Ultralytics' restricted loading: ``torch.load(weights_only=True)``
    with an allow-list of what genuine checkpoints (8.0-8.4 and the release assets) hold -- its ``nn`` modules and
    models, ``torch.nn`` modules, ``IterableSimpleNamespace``, numpy scalars and dtypes, legacy module aliases -- so
    nothing in the file runs. That mode is Ultralytics' opt-in ``SAFE_LOAD`` switch, which ``torch_safe_load`` reads
    on every call; it is set only around this call. ``trusted`` is the full unpickling (code in the file runs).

    Raises:
        Whatever Ultralytics raises for an unusable file; a refused global surfaces as a TypeError caused by
        ``pickle.UnpicklingError``.
    """
    # deferred: Ultralytics must be imported after src.env.prepare_environment()
    from ultralytics.nn import tasks

    with _restricted_unpickling(not trusted):
        model, _ = tasks.load_checkpoint(path, device="cpu")
    return model


def match_cls_branch_widths(model: nn.Module, state_dict: dict) -> list[int]:
    """Rebuild the Detect head's class branches (``cv3``) at the hidden width ``state_dict`` holds; returns the
    indices of the rebuilt branches.

    Ultralytics 8.4's ``DetectionModel.load`` keeps a pretrained model's class-branch width when it fine-tunes to
    another class count (``c3 = max(ch, min(nc, 100))`` of the source's nc: 80 for COCO), so a fine-tuned model is
    not what its YAML and nc build. Only the YOLOv8 (legacy) branch, Conv 3x3 - Conv 3x3 - Conv2d 1x1, is rebuilt.
    """
    # deferred: Ultralytics must be imported after src.env.prepare_environment()
    from ultralytics.nn.modules.conv import Conv
    from ultralytics.nn.modules.head import Detect

    head = model.model[-1]
    if not isinstance(head, Detect):
        return []
    idx = len(model.model) - 1
    rebuilt = []
    for i, branch in enumerate(head.cv3):
        key = f"model.{idx}.cv3.{i}.0.conv.weight"
        if key not in state_dict or state_dict[key].shape[0] == branch[0].conv.out_channels:
            continue
        if not (len(branch) == 3 and isinstance(branch[0], Conv) and isinstance(branch[1], Conv)
                and isinstance(branch[2], nn.Conv2d)):
            raise ValueError(f"model.{idx}.cv3.{i}: class branch of width {state_dict[key].shape[0]} in the checkpoint "
                             "but not the YOLOv8 Conv-Conv-Conv2d layout; it cannot be rebuilt")
        c_in, c3 = branch[0].conv.in_channels, state_dict[key].shape[0]
        new = nn.Sequential(Conv(c_in, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, branch[2].out_channels, 1))
        head.cv3[i] = new.to(branch[2].weight.device)
        rebuilt.append(i)
    return rebuilt


def load_yolo(path, *, trusted: bool = False):
    """Ultralytics' ``YOLO`` wrapper (predict, val) of a checkpoint file, unpickled as load_detection_checkpoint
    does: restricted unless ``trusted``."""
    # deferred: Ultralytics must be imported after src.env.prepare_environment()
    from ultralytics import YOLO

    with _restricted_unpickling(not trusted):
        return YOLO(str(path), task="detect")


@contextlib.contextmanager
def _restricted_unpickling(on: bool):
    """Ultralytics' SAFE_LOAD switch, which torch_safe_load reads on every call, set only inside the block."""
    # deferred: Ultralytics must be imported after src.env.prepare_environment()
    from ultralytics.nn import tasks

    previous = tasks.SAFE_LOAD
    tasks.SAFE_LOAD = on
    try:
        yield
    finally:
        tasks.SAFE_LOAD = previous


def report_unreadable_images() -> None:
    """Let an unreadable image's own error reach Ultralytics' "ignoring corrupt image" warning.

    Ultralytics' ``PIL.Image.open`` patch answers a file Pillow cannot identify by importing the pi-heif plugin; where
    pi-heif is not installed (offline, no auto-install) the reason then reads "No module named 'pi_heif'". Marking
    the plugin as registered keeps Pillow's "cannot identify image file ..." instead.
    """
    if importlib.util.find_spec("pi_heif") is None:
        # deferred: Ultralytics must be imported after src.env.prepare_environment()
        from ultralytics.utils import patches

        patches._pil_plugins_registered = True
