"""The model zoo: realistic architectures built from code (random init, fixed seed).

Each module exposes `build(config: str | None) -> ModelSpec` with a realistic default
config and a tiny `test` config. This package sits on the ground floor: it imports torch
and nothing from the rest of lamc.
"""

from __future__ import annotations

import importlib

from lamc.models.spec import Dim, KVCacheSpec, ModelSpec

ZOO: dict[str, str] = {
    "gpt2": "lamc.models.gpt2",
    "llama": "lamc.models.llama",
    "vit": "lamc.models.vit",
    "resnet": "lamc.models.resnet",
    "bert": "lamc.models.bert",
    "sensor-lm": "lamc.models.sensor_lm",
    "fusion": "lamc.models.fusion",
}


class UnknownZooModel(KeyError):
    """A `zoo:NAME` that is not in the zoo."""


def build(name: str, config: str | None = None) -> ModelSpec:
    """Build zoo model `name` at `config` (None = its realistic default)."""
    if name not in ZOO:
        raise UnknownZooModel(name)
    module = importlib.import_module(ZOO[name])
    spec: ModelSpec = module.build(config)
    return spec


def configs(name: str) -> list[str]:
    """The config names a zoo model accepts."""
    module = importlib.import_module(ZOO[name])
    return sorted(module.CONFIGS)


__all__ = ["ZOO", "Dim", "KVCacheSpec", "ModelSpec", "UnknownZooModel", "build", "configs"]
