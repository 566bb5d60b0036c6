"""Stage-local KV caches: each stage keeps its own layers' caches per sequence, so only
hidden states travel between stages during generation.

A step of a sequence carries the sequence's id and its position (the number of tokens
already cached). At position 0 a stage starts the sequence with empty caches; at any other
position it must hold that sequence's caches at exactly that length, else the step fails
with a clear error (the sequence was ended or evicted, or the stage restarted) instead of
computing with the wrong context. A stage that reads another stage's past tensors only for
their length (the exporter's position arithmetic) gets zeros of that length.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from lamc.dims import eval_dim
from lamc.errors import UsageError
from lamc.manifest import Manifest, StageSpec


@dataclass(frozen=True)
class Step:
    """One step of a sequence: whose caches, at which length; `end` drops them after."""

    id: str
    position: int
    end: bool = False


class CacheLost(UsageError):
    """A step arrived for caches the stage does not hold (at that length)."""


def cache_tensors(manifest: Manifest) -> set[str]:
    """Every past and present cache tensor of the pipeline."""
    names: set[str] = set()
    for stage in manifest.stages:
        if stage.kv_cache is not None:
            names.update(stage.kv_cache.past_inputs, stage.kv_cache.present_outputs)
    return names


def local_inputs(manifest: Manifest) -> tuple[str, ...]:
    """The pipeline's inputs when caches stay in their stages (no pasts)."""
    caches = cache_tensors(manifest)
    return tuple(n for n in manifest.inputs if n not in caches)


def local_outputs(manifest: Manifest) -> tuple[str, ...]:
    """The pipeline's outputs when caches stay in their stages (no presents)."""
    caches = cache_tensors(manifest)
    return tuple(n for n in manifest.outputs if n not in caches)


def zeros(
    manifest: Manifest, name: str, binding: Mapping[str, int], past_dim: str, length: int
) -> np.ndarray:
    """Cache tensor `name` in its manifest shape and dtype, `length` tokens long, zeros."""
    spec = manifest.tensors[name]
    values = {**binding, past_dim: length}
    return np.zeros(tuple(eval_dim(d, values) for d in spec.shape), dtype=np.dtype(spec.dtype))


def unsupported(manifest: Manifest) -> str | None:
    """Why this pipeline cannot keep caches in their stages, or None."""
    if not cache_tensors(manifest):
        return "the pipeline has no KV cache"
    past = {n for s in manifest.stages if s.kv_cache for n in s.kv_cache.past_inputs}
    for stage in manifest.stages:
        kv = stage.kv_cache
        own = set(kv.past_inputs) | set(kv.length_only) if kv else set()
        foreign = [n for n in stage.inputs if n in past and n not in own]
        if foreign:
            return (
                f"stage {stage.index} reads the values of other stages' caches "
                f"({', '.join(foreign)})"
            )
    return None


@dataclass
class _Entry:
    length: int
    caches: dict[str, np.ndarray] = field(default_factory=dict)


class StageCaches:
    """The caches of one stage's layers, by sequence id (least recently used evicted
    beyond `capacity` sequences)."""

    def __init__(self, manifest: Manifest, spec: StageSpec, capacity: int = 64) -> None:
        self.manifest = manifest
        self.index = spec.index
        self.capacity = capacity
        kv = spec.kv_cache
        self.pairs = list(zip(kv.past_inputs, kv.present_outputs)) if kv else []
        self.length_only = tuple(kv.length_only) if kv else ()
        self.past_dim = kv.past_dim if kv else "past"
        # The axis of the cache tensors that grows with the sequence.
        self.past_axis = (
            manifest.tensors[self.pairs[0][0]].shape.index(self.past_dim) if self.pairs else 0
        )
        every = cache_tensors(manifest)
        self.receives = tuple(n for n in spec.receives if n not in every)
        self.sends = tuple(n for n in spec.sends if n not in every)
        self.sequences: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self.sequences)

    def _zeros(self, name: str, binding: Mapping[str, int], length: int) -> np.ndarray:
        return zeros(self.manifest, name, binding, self.past_dim, length)

    def feeds(
        self, step: Step, arriving: Mapping[str, np.ndarray], binding: Mapping[str, int]
    ) -> dict[str, np.ndarray]:
        """What the stage's engine consumes: the arriving tensors (checked against
        `receives`, their dims in `binding`), this sequence's caches, and zeros of the
        right length for past tensors read only for their length."""
        if step.position < 0:
            raise UsageError(f"sequence {step.id!r}: position {step.position} is negative")
        if not self.pairs:
            entry = _Entry(step.position)
        elif step.position == 0:
            entry = _Entry(0, {p: self._zeros(p, binding, 0) for p, _ in self.pairs})
            self.sequences[step.id] = entry
        else:
            found = self.sequences.get(step.id)
            if found is None or found.length != step.position:
                held = (
                    f"it holds {found.length} tokens"
                    if found is not None
                    else "it holds none (the sequence ended, was evicted, or the stage restarted)"
                )
                raise CacheLost(
                    f"stage {self.index} has no KV cache for sequence {step.id!r} at position "
                    f"{step.position}: {held}; start the sequence again"
                )
            entry = found
        if step.id in self.sequences:
            self.sequences.move_to_end(step.id)
        feeds = dict(arriving)
        feeds.update(entry.caches)
        for name in self.length_only:
            feeds[name] = self._zeros(name, binding, step.position)
        return feeds

    def keep(self, step: Step, produced: Mapping[str, np.ndarray]) -> None:
        """Store the step's presents as the sequence's caches (or drop them at its end)."""
        if not self.pairs:
            return
        entry = self.sequences.get(step.id)
        if entry is None:
            return
        if step.end:
            del self.sequences[step.id]
            return
        entry.caches = {past: produced[present] for past, present in self.pairs}
        entry.length = int(entry.caches[self.pairs[0][0]].shape[self.past_axis])
        while len(self.sequences) > self.capacity:
            self.sequences.popitem(last=False)

    def drop(self, sequence_id: str) -> None:
        self.sequences.pop(sequence_id, None)
