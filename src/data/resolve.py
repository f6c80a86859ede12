"""Model and dataset resolution for the CLI: local files only, never a download.

``--model`` may name an Ultralytics checkpoint (.pt), a model YAML (a file, or a name
such as ``yolov8n.yaml`` from the ultralytics package, for random init) or a QAT
checkpoint of this toolkit; ``--data`` names an Ultralytics data YAML. Everything
missing fails at once with an error that lists where it looked and what to do.

Ultralytics checkpoints are pickles of whole modules, and a pickle can run any code on load.
``load_fp32_model`` therefore unpickles them with Ultralytics' restricted loading (the classes
genuine checkpoints hold, nothing else) and refuses any other file, naming what it would
import and the way out (``--trust-checkpoint``: full unpickling of a file the user vouches
for). ``resolve_model_path`` only peeks with ``torch.load(weights_only=True)``, which refuses
module pickles (that refusal is how they are told apart from QAT checkpoints, which are
plain dicts of tensors and builtins).
"""

from __future__ import annotations

import pickle
import pickletools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from src.env import REPO_ROOT, prepare_environment
from src.errors import DataError, ModelLoadError, ModelNotFoundError
from src.integrations.ultralytics import load_detection_checkpoint, set_model_args

# A QAT checkpoint is a torch.save'd dict holding this key (its value: the format version).
QAT_CHECKPOINT_KEY = "yolov8_qat"

VARIANTS = ("n", "s", "m", "l", "x")
YAML_SUFFIXES = (".yaml", ".yml")
SYNTHETIC_HINT = "python -m src.data.synthetic --out dataset/shapes"

ModelKind = Literal["checkpoint", "yaml", "qat_checkpoint"]


@dataclass(frozen=True)
class ResolvedModel:
    """Where a ``--model`` argument points.

    Attributes:
        kind: "checkpoint" (Ultralytics .pt), "yaml" (architecture, random init) or
            "qat_checkpoint" (saved by this toolkit; a dict holding QAT_CHECKPOINT_KEY).
        path: Absolute path of the file; for a YAML from the ultralytics package, its name
            (e.g. "yolov8n.yaml") because ultralytics reads the scale letter from the name.
        source: The argument as given, for messages.
    """

    kind: ModelKind
    path: Path | str
    source: str


def default_search_dirs() -> tuple[Path, ...]:
    """Folders searched for a bare checkpoint name: models/pretrained/ (cwd's, then the repo's), then cwd."""
    cwd = Path.cwd()
    dirs = [cwd / "models" / "pretrained", REPO_ROOT / "models" / "pretrained", cwd]
    return tuple(dict.fromkeys(d.resolve() for d in dirs))


def resolve_model_path(
    model: str | Path | None, variant: str = "n", search_dirs: tuple[Path, ...] | None = None
) -> ResolvedModel:
    """Find the model a ``--model`` argument names, without loading or downloading it.

    Args:
        model: A .pt path or bare name, a model YAML path or packaged name, or None for
            ``yolov8{variant}.pt``.
        variant: Model size letter used when ``model`` is None.
        search_dirs: Folders tried in order for a bare .pt name; default_search_dirs() if None.

    Returns:
        The resolved kind and path.

    Raises:
        ModelNotFoundError: Nothing local matches; the message lists every place tried.
        ModelLoadError: The file exists but is not a readable PyTorch checkpoint.
    """
    if model is None:
        if variant not in VARIANTS:
            raise ModelNotFoundError(f"model.variant={variant!r} is not a YOLOv8 size; use one of {list(VARIANTS)}.")
        text = f"yolov8{variant}.pt"
    else:
        text = str(model).strip()
    if not text:
        raise ModelNotFoundError("--model is empty; pass a .pt checkpoint or a model YAML such as yolov8n.yaml.")
    if "://" in text:
        raise ModelNotFoundError(
            f"--model {text} is a URL, and this toolkit never downloads. Download it yourself, put it in "
            f"{REPO_ROOT / 'models' / 'pretrained'}, and pass its file name."
        )

    suffix = Path(text).suffix.lower()
    if suffix in YAML_SUFFIXES:
        return _resolve_yaml(text)
    if suffix != ".pt":
        raise ModelNotFoundError(
            f"--model {text}: expected a PyTorch checkpoint (.pt) or a model YAML (.yaml), got {suffix or 'no suffix'!r}. "
            "Exported models (.onnx, OpenVINO .xml, .tflite) are deployment outputs, not training inputs."
        )

    path = Path(text).expanduser()
    if path.is_absolute() or len(path.parts) > 1:
        candidates = [path.resolve()]
    else:
        candidates = [d / path for d in (search_dirs if search_dirs is not None else default_search_dirs())]
    for candidate in candidates:
        if candidate.is_file():
            return ResolvedModel(_checkpoint_kind(candidate), candidate.resolve(), text)
    raise ModelNotFoundError(_not_found_message(text, candidates, model is None, variant))


def _not_found_message(text: str, candidates: list[Path], defaulted: bool, variant: str) -> str:
    why = f"no --model given, so model.variant={variant!r} selects {text}; " if defaulted else ""
    looked = "\n".join(f"  - {c}" for c in candidates)
    stem = Path(text).stem
    yaml_name = f"{stem}.yaml" if stem.startswith("yolov8") else "yolov8n.yaml"
    return (
        f"{why}model checkpoint {text!r} not found. Looked in:\n{looked}\n"
        "This toolkit never downloads weights. Either:\n"
        f"  - copy the checkpoint to {REPO_ROOT / 'models' / 'pretrained' / Path(text).name} "
        "(Ultralytics publishes yolov8*.pt on its GitHub releases page; fetch it on a connected machine),\n"
        f"  - start from random init with a model YAML: --model {yaml_name},\n"
        "  - or train an FP32 model first and pass its weights/best.pt."
    )


def _checkpoint_kind(path: Path) -> ModelKind:
    """Tell a QAT checkpoint (a safe dict) from an Ultralytics one (a pickle of modules) without unpickling code."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return "checkpoint"  # references classes: an Ultralytics pickle, unpickled only if loaded
    except Exception as err:  # torch reports damage as RuntimeError, EOFError, KeyError, ... depending on where
        raise ModelLoadError(
            f"{path} is not a readable PyTorch checkpoint (empty, truncated or corrupted: "
            f"{type(err).__name__}: {str(err)[:200]}). Copy or export the file again."
        ) from err
    if isinstance(obj, dict) and QAT_CHECKPOINT_KEY in obj:
        return "qat_checkpoint"
    return "checkpoint"


def _resolve_yaml(text: str) -> ResolvedModel:
    """A model YAML file on disk, or a bare name found among the ultralytics package's model configs."""
    path = Path(text).expanduser()
    if path.is_file():
        return ResolvedModel("yaml", path.resolve(), text)
    if len(path.parts) == 1 and _packaged_model_yaml(text) is not None:
        return ResolvedModel("yaml", text, text)
    raise ModelNotFoundError(
        f"model YAML {text!r} not found: not a file at {path.resolve()} and not a model config of the "
        "installed ultralytics package. Use a packaged name such as yolov8n.yaml (sizes n/s/m/l/x) or a path "
        "to your own model YAML."
    )


def _packaged_model_yaml(name: str) -> dict | None:
    """The model dict for a packaged name like yolov8s.yaml, or None; searches files only."""
    prepare_environment()
    # deferred: Ultralytics reads its environment at import, after prepare_environment()
    from ultralytics.nn.tasks import yaml_model_load

    try:
        cfg = yaml_model_load(name)  # maps yolov8s.yaml to yolov8.yaml with scale "s", as ultralytics does
    except FileNotFoundError:
        return None
    return cfg if "backbone" in cfg and "head" in cfg else None  # a dataset YAML of the same name is not a model


def load_fp32_model(resolved: ResolvedModel, nc: int | None = None, *, trusted: bool = False):
    """Build or load the float model a resolved ``--model`` names.

    Args:
        resolved: From resolve_model_path(); kind "checkpoint" or "yaml".
        nc: Number of classes for a YAML model (its own nc if None). Ignored for checkpoints,
            whose head is already sized.
        trusted: The user vouches for the checkpoint (``--trust-checkpoint``): unpickle it fully, which
            runs any code it holds. Otherwise only what genuine Ultralytics checkpoints contain loads.

    Returns:
        An ultralytics DetectionModel in float32 on CPU, in eval mode, with every parameter
        trainable (checkpoints store EMA weights with gradients off). ``model.args`` is a dict
        of training hyperparameters (the checkpoint's, else ultralytics' defaults).

    Raises:
        ModelLoadError: A QAT checkpoint, a non-detection model, an unreadable file, or (unless
            ``trusted``) a file holding anything besides what Ultralytics checkpoints contain.
    """
    prepare_environment()
    if resolved.kind == "qat_checkpoint":
        raise ModelLoadError(
            f"{resolved.path} is a QAT checkpoint of this toolkit, not an FP32 model; load it with "
            "src.models.yolov8_qat (train_qat.py does when it is passed as --model)."
        )
    if resolved.kind == "yaml":
        model = _build_from_yaml(resolved, nc)
    else:
        model = _load_ultralytics_checkpoint(Path(resolved.path), trusted)
    model = model.float().cpu().eval()
    # checkpoints store weights with gradients off; DFL's fixed integral conv stays frozen, as in Ultralytics' trainer
    for name, p in model.named_parameters():
        p.requires_grad_(".dfl" not in name)
    return model


def load_fp32_source(source: str | None, variant: str, *, required: bool = True, trusted: bool = False):
    """The float model a QAT checkpoint names as its ``fp32_source``; None when there is none.

    The path comes from inside a file, so it loads like ``--model`` does: restricted unless ``trusted``.

    Args:
        source: The recorded path.
        variant: ``model.variant`` (resolution of a bare name).
        required: Load even a file that is gone (its not-found error names the fix); else skip it.
        trusted: As for :func:`load_fp32_model`.
    """
    if not source or not (required or Path(source).exists()):
        return None
    return load_fp32_model(resolve_model_path(source, variant), trusted=trusted)


def _build_from_yaml(resolved: ResolvedModel, nc: int | None):
    # deferred: Ultralytics reads its environment at import, after prepare_environment()
    from ultralytics.cfg import DEFAULT_CFG_DICT
    from ultralytics.nn.tasks import DetectionModel, guess_model_task, yaml_model_load  # deferred: as above

    try:
        cfg = yaml_model_load(resolved.path)
    except (FileNotFoundError, yaml.YAMLError, OSError) as err:
        raise ModelLoadError(f"model YAML {resolved.path} cannot be read ({err}); fix or replace the file.") from err
    if not isinstance(cfg, dict) or "backbone" not in cfg or "head" not in cfg:
        raise ModelLoadError(f"{resolved.path} is not a model YAML (no backbone/head sections); pass e.g. yolov8n.yaml.")
    require_detection(guess_model_task(cfg), f"model YAML {resolved.path}")
    if nc is not None and (not isinstance(nc, int) or isinstance(nc, bool) or nc < 1):
        raise ModelLoadError(f"nc={nc!r} must be a positive integer (the dataset's number of classes).")
    model = DetectionModel(cfg, nc=nc, verbose=False)
    set_model_args(model, dict(DEFAULT_CFG_DICT))
    return model


def _load_ultralytics_checkpoint(path: Path, trusted: bool):
    # deferred: Ultralytics reads its environment at import, after prepare_environment()
    from ultralytics.nn.tasks import DetectionModel, guess_model_task

    try:
        model = load_detection_checkpoint(path, trusted=trusted)
    except Exception as err:  # the loader fails in many ways (TypeError, AttributeError, ImportError, ...): all mean "unusable file"
        refused = [] if trusted else _unsafe_globals(path)
        if refused:
            raise ModelLoadError(
                f"{path} was not loaded: unpickling it would import {', '.join(refused)}, which Ultralytics "
                "checkpoints do not contain, and a pickle can run code on load. If you vouch for this file, pass "
                "--trust-checkpoint to unpickle it fully; otherwise use a checkpoint saved by Ultralytics "
                "(e.g. a trainer's weights/best.pt)."
            ) from err
        raise ModelLoadError(
            f"{path} could not be loaded as an Ultralytics checkpoint ({type(err).__name__}: {_plain(err)}). "
            "Pass a detection checkpoint saved by Ultralytics 8.x (e.g. a trainer's weights/best.pt), "
            "or a model YAML such as yolov8n.yaml."
        ) from err
    if type(model) is not DetectionModel:
        # From the architecture's head; model.args["task"] falls back to "detect" when train_args lack it.
        require_detection(guess_model_task(getattr(model, "yaml", None) or model), f"{path} ({type(model).__name__})")
    return model


def require_detection(task: str, source: str) -> None:
    """Refuse a model of another task than detection, naming it (train_qat.py trains and evaluates detection)."""
    if task != "detect":
        raise ModelLoadError(
            f"{source} defines a {task!r} model; train_qat.py trains and evaluates detection models only. Use a "
            "detection model such as yolov8n.yaml or yolov8n.pt (segment and pose models are prepared and exported "
            "from Python: README, 'Quantizing a custom YOLOv8 model')."
        )


def _unsafe_globals(path: Path) -> list[str]:
    """What ``path`` imports beyond weights-only loading's allow-list, found statically (nothing in it runs)."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except ValueError:  # not a torch.save archive: a raw pickle, which Ultralytics never writes; all it imports
        return _pickle_globals(path.read_bytes())
    except (RuntimeError, OSError):  # a damaged archive: no refusal to report
        return []


# pickletools opcodes that push a string (a STACK_GLOBAL's module and name are the two pushed last)
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}


def _pickle_globals(data: bytes) -> list[str]:
    """``module.name`` of every class or function a raw pickle imports, disassembled by pickletools."""
    found, last, memo = set(), [None, None], {}
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "MEMOIZE":
                memo[len(memo)] = last[-1]
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = last[-1]
            else:
                if op.name == "GLOBAL":
                    found.add(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and all(isinstance(s, str) for s in last):
                    found.add(".".join(last))
                value = memo.get(arg) if op.name in ("GET", "BINGET", "LONG_BINGET") else \
                    arg if op.name in _STRING_OPS else None
                last = [last[-1], value]
    except ValueError:  # truncated or not a pickle after all: report what was read
        pass
    return sorted(found)


def _plain(err: BaseException) -> str:
    """First line of an ultralytics error, without its emoji decoration."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text.replace("ERROR ❌️ ", "")[:300]


def resolve_data(data: str | Path, splits: tuple[str, ...] = ("train", "val", "test")) -> dict[str, Any]:
    """Check an Ultralytics data YAML and the image folders it names, without downloading.

    Run this before any model work so a missing dataset fails in seconds.

    Args:
        data: Path to a data YAML, a folder holding data.yaml, or the name of a dataset YAML
            shipped with ultralytics (e.g. coco.yaml; its images must already be local).
        splits: The splits whose images must exist (an evaluation-only run reads no training images).

    Returns:
        ultralytics' checked dataset dict (``nc``, ``names``, absolute ``train``/``val``, ``path``, ...).

    Raises:
        DataError: The YAML or a split's images are missing, or the YAML is malformed.
    """
    text = str(data).strip()
    if not text:
        raise DataError(f"--data is empty; pass a data YAML. To create the built-in one: {SYNTHETIC_HINT}")
    if "://" in text:
        raise DataError(f"--data {text} is a URL, and this toolkit never downloads; download and unpack it yourself.")
    prepare_environment()
    yaml_path = _find_data_yaml(text)
    raw = _read_yaml(yaml_path)
    root = _dataset_root(raw, yaml_path)
    for split in splits:
        _check_split(raw, split, root, yaml_path)

    # deferred: Ultralytics reads its environment at import, after prepare_environment()
    from ultralytics.data.utils import check_det_dataset

    try:
        return check_det_dataset(str(yaml_path), autodownload=False)
    except (SyntaxError, TypeError, ValueError, FileNotFoundError, KeyError) as err:
        raise DataError(f"data YAML {yaml_path} is invalid: {_plain(err)}") from err


def _find_data_yaml(text: str) -> Path:
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "data.yaml"
    if path.is_file():
        return path.resolve()
    if len(Path(text).parts) == 1 and Path(text).suffix.lower() in YAML_SUFFIXES:
        # deferred: Ultralytics reads its environment at import, after prepare_environment()
        from ultralytics.utils.checks import check_yaml

        packaged = check_yaml(text, hard=False)  # a search of the installed package only: no scheme, no download
        if packaged:
            return Path(packaged).resolve()
    raise DataError(
        f"data YAML {text!r} not found (looked for {path.resolve()} and among ultralytics' packaged dataset YAMLs). "
        f"Pass the path of your dataset's YAML, or create the built-in synthetic set with: {SYNTHETIC_HINT} "
        "and pass --data dataset/shapes/data.yaml."
    )


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"data YAML {path} cannot be parsed ({err}); fix its syntax.") from err
    if not isinstance(raw, dict):
        raise DataError(f"data YAML {path} must be a mapping with train, val and names keys; got {type(raw).__name__}.")
    if "val" not in raw and "validation" in raw:
        raw["val"] = raw["validation"]
    for key in ("train", "val"):
        if not raw.get(key):
            raise DataError(f"data YAML {path} has no {key!r} entry; add '{key}: <images folder or list file>'.")
    return raw


def _dataset_root(raw: dict, yaml_path: Path) -> Path:
    """The folder split paths are relative to, by the rule check_det_dataset applies."""
    # deferred: Ultralytics reads its environment at import, after prepare_environment()
    from ultralytics.utils import DATASETS_DIR

    root = Path(str(raw.get("path") or yaml_path.parent))
    if not root.exists() and not root.is_absolute():
        root = DATASETS_DIR / root
    return root


def _check_split(raw: dict, split: str, root: Path, yaml_path: Path) -> None:
    entries = raw.get(split)
    if not entries:
        return
    for entry in entries if isinstance(entries, list) else [entries]:
        target = (root / str(entry)).resolve()
        if not target.exists() and str(entry).startswith("../"):
            target = (root / str(entry)[3:]).resolve()  # check_det_dataset's fallback for '../' entries
        if target.exists():
            continue
        fetch = (
            "Its YAML has a download script, but this toolkit never downloads: fetch the data on a connected "
            f"machine and unpack it so that {target} exists (or edit 'path:' in the YAML). "
            if raw.get("download")
            else f"Put the images there or fix 'path:'/'{split}:' in the YAML. "
        )
        raise DataError(
            f"dataset {yaml_path}: {split} images not found, missing path {target}. {fetch}"
            f"For the built-in synthetic set run: {SYNTHETIC_HINT} and pass --data dataset/shapes/data.yaml."
        )
