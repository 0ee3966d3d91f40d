"""Rendering an engine's argv template (no shell: each element stays one argv element)."""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Final

from pool_managerd.adapters.engines.errors import TemplateError

__all__ = ["PLACEHOLDERS", "render_argv"]


PLACEHOLDERS: Final = frozenset({"model", "port", "host", "tensor_split", "n_gpus"})
"""Placeholders an argv template may use."""

_OPTIONAL: Final = frozenset({"tensor_split"})
# Flags whose value is an optional placeholder: dropped together with an empty value.
_OPTIONAL_FLAGS: Final = {"tensor_split": frozenset({"--tensor-split", "-ts"})}
_FORMATTER: Final = string.Formatter()


def render_argv(template: Sequence[str], values: Mapping[str, str | int]) -> list[str]:
    """Substitute ``{model} {port} {host} {tensor_split} {n_gpus}`` inside each argv element.

    Each element stays one argv element whatever it contains (there is no shell). ``{{`` and
    ``}}`` are literal braces. Errors (all :class:`TemplateError`): an unknown placeholder, a
    conversion or format spec (``{port!r}``, ``{port:5}``), attribute or index access, unbalanced
    braces, an empty template, a required placeholder with no value or an empty one.

    ``{tensor_split}`` is optional (a single-GPU placement has none): when its value is missing or
    empty, an element that is exactly ``{tensor_split}`` is dropped together with the element
    before it if that is ``--tensor-split`` or ``-ts``, and an element ``--tensor-split={tensor_split}``
    (or ``-ts=...``) is dropped. Any other use of an empty ``{tensor_split}`` renders as ``""``.
    """
    if not template:
        raise TemplateError("argv template is empty")
    out: list[str] = []
    for element in template:
        try:
            parts = list(_FORMATTER.parse(element))
        except ValueError as exc:
            raise TemplateError(f"argv element {element!r}: {exc}") from None
        rendered: list[str] = []
        empty_optional: str | None = None
        only_placeholder = len(parts) == 1 and parts[0][0] == "" and parts[0][1] is not None
        for literal, name, spec, conv in parts:
            rendered.append(literal)
            if name is None:
                continue
            if name not in PLACEHOLDERS:
                known = ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
                raise TemplateError(f"argv element {element!r}: unknown placeholder {{{name}}} ({known})")
            if spec or conv:
                raise TemplateError(f"argv element {element!r}: format specs and conversions are not allowed")
            value = values.get(name)
            text = "" if value is None else str(value)
            if not text:
                if name not in _OPTIONAL:
                    raise TemplateError(f"argv element {element!r}: no value for {{{name}}}")
                empty_optional = name
            rendered.append(text)
        if empty_optional is not None:
            flags = _OPTIONAL_FLAGS[empty_optional]
            if only_placeholder:
                if out and out[-1] in flags:
                    out.pop()
                continue
            if len(parts) == 1 and parts[0][0].endswith("=") and parts[0][0][:-1] in flags:
                continue
        out.append("".join(rendered))
    if not out or not out[0]:
        raise TemplateError("argv template renders to no executable")
    return out
