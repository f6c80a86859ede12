"""Which exports a command line names: files, export directories in the spec's layout, Ultralytics model dirs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from src.errors import QATError
from src.export import registry
from src.export.registry import ExportFormat


class ValidationInputError(QATError):
    """A --model/--data/--reference argument cannot be used (message names it and the fix)."""


@dataclass
class Target:
    path: Path
    format: str  # a registry name; "tensorrt" is the TensorRT-ready ONNX, run with ONNX Runtime here

    @property
    def spec(self) -> ExportFormat:
        return registry.get(self.format)


def _or_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def discover(paths: list[str]) -> list[Target]:
    """Exports named on the command line: files, an export dir in the spec's layout or one of its format folders
    (``<export-dir>/openvino``), or ``*_openvino_model`` dirs."""
    targets: list[Target] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise ValidationInputError(f"--model {raw}: no such file or directory; pass an exported .onnx, an "
                                       "OpenVINO .xml / *_openvino_model dir, a .tflite, or the --export-dir folder "
                                       "(or one of its format folders)")
        if p.is_dir():
            found = _discover_dir(p)
            if not found:
                looked = [f"{f.folder}/*{f.suffix}" for f in registry.FORMATS.values()]
                looked += [f"*{f.suffix} in *{f.model_dir_suffix}" for f in registry.FORMATS.values()
                           if f.model_dir_suffix]
                raise ValidationInputError(f"--model {raw}: no exports found (looked for "
                                           f"{', '.join(looked[:-1])} and {looked[-1]})")
            targets.extend(found)
        else:
            targets.append(Target(p, _format_of(p)))
    for t in targets:
        _check_companions(t)
    return targets


def _check_companions(t: Target) -> None:
    """The files an export needs beside its main artifact (an IR's .bin) are there: the runtime would otherwise fail
    on a temporary copy's path."""
    missing = [t.path.with_suffix(c) for c in t.spec.companions if not t.path.with_suffix(c).is_file()]
    if missing:
        raise ValidationInputError(f"--model {t.path}: {missing[0]} is missing; {t.format} exports are the "
                                   f"{t.path.suffix} file and its {', '.join(t.spec.companions)} side by side, copy "
                                   "both")


def _discover_dir(d: Path) -> list[Target]:
    own = registry.dir_format(d)
    found = [Target(x, own.name) for x in sorted(d.glob(f"*{own.suffix}"))] if own is not None else []
    if found:
        return found
    # not one format's folder (or an export dir that happens to carry a format's name): the spec's layout
    found = [Target(x, f.name) for f in registry.FORMATS.values() for x in sorted((d / f.folder).glob(f"*{f.suffix}"))]
    for f in registry.FORMATS.values():
        if f.model_dir_suffix:
            for sub in sorted(d.glob(f"*{f.model_dir_suffix}")):
                found += [Target(x, f.name) for x in sorted(sub.glob(f"*{f.suffix}"))]
    if not found:
        # loose files: only self-contained ones (an IR .xml is recognised in its folder or when named explicitly)
        loose = sorted({f.suffix for f in registry.FORMATS.values() if not f.companions})
        found = [Target(x, _format_of(x)) for x in sorted(x for s in loose for x in d.glob(f"*{s}"))]
    return found


def _format_of(p: Path) -> str:
    fmt = registry.of_path(p)
    if fmt is not None:
        return fmt.name
    reason = registry.unvalidated_reason(p)
    if reason:
        raise ValidationInputError(f"--model {p}: {reason}")
    labels = list(dict.fromkeys(f.label for f in registry.FORMATS.values()))
    raise ValidationInputError(f"--model {p}: unsupported export format {p.suffix.lower() or '(no suffix)'}; "
                               f"expected {_or_list(labels)}")
