"""Errors of starting engines, rendering their argv and reading the spawn record."""

from __future__ import annotations

from pool_managerd.contract.errors import PoolManagerError

__all__ = ["SpawnError", "SpawnRecordError", "TemplateError"]


class SpawnError(PoolManagerError):
    """An engine could not be started. ``reason`` is one of ``not_found``, ``permission``,
    ``port_in_use``, ``log`` (the log file could not be opened), ``os_error``."""

    code = "internal"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TemplateError(PoolManagerError):
    """An argv template is malformed, names an unknown placeholder or lacks a required value."""

    code = "bad_request"


class SpawnRecordError(PoolManagerError):
    """The spawn record exists but cannot be read back."""

    code = "internal"
