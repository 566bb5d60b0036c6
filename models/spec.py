"""The factory contract: what a model factory hands to lamc.

A factory is a callable `factory()` or `factory(config)` returning a `ModelSpec` (or the
tuple `(module, example_inputs, dynamic)`). `example_inputs` are the keyword arguments of
`module.forward`, in order; `dynamic` names the dynamic axes of each input with their
ranges. Dims that share a name are the same symbol (batch on every input, say).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Dim:
    """A dynamic dimension with its inclusive range."""

    name: str
    min: int
    max: int

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"dim name {self.name!r} is not an identifier")
        if not 0 <= self.min <= self.max:
            raise ValueError(f"dim {self.name}: need 0 <= min <= max, got {self.min}:{self.max}")


@dataclass(frozen=True)
class KVCacheSpec:
    """How a decoder exposes its cache: per layer, past key/value inputs and present outputs.

    `past_inputs[i]` and `present_outputs[i]` are the (key, value) tensor names of layer i.
    `layer_scopes[i]` is the module path of layer i (e.g. `transformer.h.3`). Cache tensors
    are laid out [batch, kv_heads, past, head_dim].
    """

    past_inputs: tuple[tuple[str, str], ...]
    present_outputs: tuple[tuple[str, str], ...]
    layer_scopes: tuple[str, ...]
    kv_heads: int
    head_dim: int
    past_dim: str = "past"
    max_context: int = 1024


def decoder_cache(
    inputs: dict[str, torch.Tensor],
    dynamic: dict[str, dict[int, Dim]],
    *,
    layers: int,
    kv_heads: int,
    head_dim: int,
    max_context: int,
    layer_scope: str,
    batch_dim: Dim,
    generator: torch.Generator,
) -> tuple[KVCacheSpec, list[str]]:
    """A decoder's flat KV cache, the one layout lamc captures: per layer `past.{i}.key`
    and `past.{i}.value` inputs [batch, kv_heads, past, head_dim] (added to `inputs` and
    `dynamic`), and `present.{i}.*` outputs. `layer_scope` names layer i's module with
    `{i}` (`transformer.h.{i}`). Returns the spec and the present output names."""
    past_dim = Dim("past", 0, max_context)
    past, present = [], []
    for i in range(layers):
        for kind in ("key", "value"):
            name = f"past.{i}.{kind}"
            inputs[name] = torch.randn(2, kv_heads, 3, head_dim, generator=generator)
            dynamic[name] = {0: batch_dim, 2: past_dim}
        past.append((f"past.{i}.key", f"past.{i}.value"))
        present.append((f"present.{i}.key", f"present.{i}.value"))
    spec = KVCacheSpec(
        past_inputs=tuple(past),
        present_outputs=tuple(present),
        layer_scopes=tuple(layer_scope.format(i=i) for i in range(layers)),
        kv_heads=kv_heads,
        head_dim=head_dim,
        max_context=max_context,
    )
    return spec, [n for pair in present for n in pair]


@dataclass
class ModelSpec:
    """A model ready to capture: module, example inputs and dynamic dimensions."""

    module: torch.nn.Module
    example_inputs: dict[str, torch.Tensor]
    dynamic: dict[str, dict[int, Dim]] = field(default_factory=dict)
    output_names: list[str] | None = None
    # Value range [low, high) of integer inputs (token ids), used to draw valid random inputs.
    int_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    name: str = "model"
    kv_cache: KVCacheSpec | None = None
    # The shape to analyse and plan for (dim name -> size); defaults to the example inputs'.
    # Examples are traced at sizes >= 2 so torch.export does not specialise a dim to 1,
    # while the operating point can be batch 1.
    operating_point: dict[str, int] = field(default_factory=dict)
    # `lamc train`: the loss of a step, `loss(outputs, target)` -> a scalar tensor, where
    # the target is the data's `labels` (or, without labels, its `input_ids`). None: the
    # task's own (a causal LM's next-token loss, a classifier's cross entropy).
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def dims(self) -> dict[str, Dim]:
        """Every dynamic dim by name; a name used with two ranges is an error."""
        found: dict[str, Dim] = {}
        for axes in self.dynamic.values():
            for dim in axes.values():
                if dim.name in found and found[dim.name] != dim:
                    raise ValueError(f"dim {dim.name!r} is declared with two ranges")
                found[dim.name] = dim
        return found


def decoder_spec(
    module: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    dynamic: dict[str, dict[int, Dim]],
    *,
    name: str,
    vocab: int,
    operating_point: dict[str, int],
    kv: bool,
    batch_dim: Dim,
    generator: torch.Generator,
    layers: int,
    kv_heads: int,
    head_dim: int,
    max_context: int,
    layer_scope: str,
) -> ModelSpec:
    """A decoder's spec: `logits` out; with `kv`, its flat KV cache (`decoder_cache`) as
    inputs and outputs too, planned at past 0."""
    outputs = ["logits"]
    kv_spec = None
    if kv:
        kv_spec, presents = decoder_cache(
            inputs,
            dynamic,
            layers=layers,
            kv_heads=kv_heads,
            head_dim=head_dim,
            max_context=max_context,
            layer_scope=layer_scope,
            batch_dim=batch_dim,
            generator=generator,
        )
        outputs += presents
        operating_point = {**operating_point, "past": 0}
    return ModelSpec(
        module=module,
        example_inputs=inputs,
        dynamic=dynamic,
        output_names=outputs,
        int_ranges={"input_ids": (0, vocab)},
        name=name,
        kv_cache=kv_spec,
        operating_point=operating_point,
    )


def seeded(seed: int = 0) -> torch.Generator:
    """Zoo weights are random but fixed: the same config gives the same model."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def parse_config(
    text: str | None, configs: Mapping[str, object], default: str
) -> tuple[str, dict[str, str]]:
    """Split `NAME[,key=value,...]` into a base config name and overrides.

    `zoo:gpt2:test,kv=1,layers=6` reaches a factory as `test,kv=1,layers=6`.
    """
    if not text:
        return default, {}
    head, *rest = text.split(",")
    base = head.strip() or default
    if base not in configs:
        raise ValueError(f"unknown config {base!r}; choose one of {', '.join(sorted(configs))}")
    overrides: dict[str, str] = {}
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"config override {item!r} is not key=value")
        overrides[key.strip()] = value.strip()
    return base, overrides


# What a zoo override may ask for: enough for any real configuration, never a model too
# large to build (`layers=100000000` would try to allocate it).
OVERRIDE_RANGES = {"layers": (1, 256), "batch": (1, 64), "seq": (1, 1 << 16)}


def override_int(overrides: dict[str, str], key: str, default: int) -> int:
    """Pop an integer override (`layers=6`)."""
    if key not in overrides:
        return default
    value = overrides.pop(key)
    try:
        number = int(value)
    except ValueError as exc:
        raise ValueError(f"config override {key}={value!r} is not an integer") from exc
    low, high = OVERRIDE_RANGES.get(key, (1, 1 << 20))
    if not low <= number <= high:
        raise ValueError(f"config override {key}={value!r} is outside {low}..{high}")
    return number


def override_bool(overrides: dict[str, str], key: str, default: bool) -> bool:
    """Pop a boolean override (`kv=1`, `kv=true`)."""
    if key not in overrides:
        return default
    value = overrides.pop(key).lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"config override {key}={value!r} is not a boolean")


def reject_leftovers(overrides: dict[str, str]) -> None:
    """Unknown overrides are an error, never silently ignored."""
    if overrides:
        raise ValueError(f"unknown config override(s): {', '.join(sorted(overrides))}")
