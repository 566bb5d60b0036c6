"""Registers every command on the `lamc` group. Each command lives in its own module and
imports the heavy compile-side packages only when it runs."""

from __future__ import annotations

from lamc.cli import inspect_cmd, plan_cmd, profile_cmd  # noqa: F401
