"""The implementation of each registered export format, imported on first use (the registry itself is plain data)."""

from __future__ import annotations

import importlib

from src.errors import QATError
from src.export.common import ExportContext
from src.export.registry import ExportFormat, FormatHooks


def hooks(fmt: ExportFormat) -> FormatHooks:
    """The module implementing ``fmt`` (deferred: it imports that format's runtime)."""
    return importlib.import_module(fmt.module)


def check(fmt: ExportFormat, ctx: ExportContext) -> None:
    """Refuse the settings and then the model ``fmt`` cannot export, before any format writes a file."""
    if ctx.opts.dynamic and fmt.static_shapes:
        raise QATError(f"export.dynamic: true is not supported for {fmt.title} ({fmt.static_shapes}); set "
                       f"export.dynamic: false or remove {fmt.name} from export.formats")
    hooks(fmt).check(ctx)
