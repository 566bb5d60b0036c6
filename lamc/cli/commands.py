"""Where each `lamc` command lives: each in its own module, which registers it on the
`lamc` group when imported and imports the heavy compile-side packages only when it runs."""

from __future__ import annotations

MODULES = {
    "agent": "agent_cmd",
    "bench": "bench_cmd",
    "bundle": "bundle_cmd",
    "compile": "compile_cmd",
    "control": "control_cmd",
    "diff": "diff_cmd",
    "generate": "generate_cmd",
    "ingress": "ingress_cmd",
    "inspect": "inspect_cmd",
    "plan": "plan_cmd",
    "profile": "profile_cmd",
    "run": "run_cmd",
    "serve": "serve_cmd",
    "train": "train_cmd",
    "validate": "validate_cmd",
}


def register(name: str | None = None) -> None:
    """Register command `name` on the `lamc` group; every command when `name` is None or
    not one of them (help lists them all, and click names the unknown one)."""
    import importlib

    for module in [MODULES[name]] if name in MODULES else MODULES.values():
        importlib.import_module(f"lamc.cli.{module}")
