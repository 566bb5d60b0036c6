"""Registers every command on the `lamc` group. Each command lives in its own module and
imports the heavy compile-side packages only when it runs."""

from __future__ import annotations

from lamc.cli import (  # noqa: F401
    compile_cmd,
    generate_cmd,
    inspect_cmd,
    plan_cmd,
    profile_cmd,
    run_cmd,
    serve_cmd,
    validate_cmd,
)
