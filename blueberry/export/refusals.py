"""The two refusals of the conversions: a model that a target format cannot represent exactly
(`ExportError`), and a source model whose settings Blueberry cannot represent (`ImportRefused`). Both are
usage errors: one line naming the field, exit 2."""

from __future__ import annotations

from ..errors import UsageError


class ExportError(UsageError):
    pass


class ImportRefused(UsageError):
    pass
