"""Pass infrastructure: lamc passes are onnx_ir passes with `requires`/`call`/`ensures`.

The `PassManager` runs an explicit, ordered list, can dump the IR after each pass, and
on failure names the pass that failed and the passes that ran before it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir
from onnx_ir.passes import FunctionalPass, InPlacePass, PassResult

from lamc.errors import InternalError, LamcError

__all__ = ["Pass", "PassManager", "PassResult", "PassTiming", "RewritePass"]


class Pass(InPlacePass):
    """A lamc pass: edits or annotates the model in place."""

    @property
    def name(self) -> str:
        return type(self).__name__


class RewritePass(FunctionalPass):
    """A lamc pass that returns a new model (compression of a stage's model)."""

    @property
    def name(self) -> str:
        return type(self).__name__


@dataclass
class PassTiming:
    name: str
    seconds: float
    modified: bool


@dataclass
class PassManager:
    passes: Sequence[Pass | RewritePass]
    dump_ir: Path | None = None
    timings: list[PassTiming] = field(default_factory=list)
    # Number of the first pass in the dump: a later pipeline continues an earlier one's
    # numbering (capture's passes, then the partitioner's tags) in the same directory.
    first: int = 1

    def run(self, model: ir.Model) -> PassResult:
        modified = False
        if self.dump_ir is not None:
            self.dump_ir.mkdir(parents=True, exist_ok=True)
            if self.first == 1:
                _dump(model, self.dump_ir / "00-input")
        for i, pass_ in enumerate(self.passes, start=self.first):
            before = [p.name for p in self.passes[: i - self.first]]
            context = f"in pass {pass_.name}" + (
                f" (after {', '.join(before)})" if before else " (the first pass)"
            )
            started = time.perf_counter()
            try:
                result = pass_(model)
            except LamcError as exc:
                exc.message = f"{exc.message} [{context}]"
                raise
            except Exception as exc:
                raise InternalError(f"{type(exc).__name__}: {exc} [{context}]") from exc
            self.timings.append(
                PassTiming(pass_.name, time.perf_counter() - started, result.modified)
            )
            modified |= result.modified
            model = result.model
            if self.dump_ir is not None:
                _dump(model, self.dump_ir / f"{i:02d}-{pass_.name}")
        return PassResult(model, modified)


def _dump(model: ir.Model, stem: Path) -> None:
    """The graph as ONNX text (no weights) and lamc's annotations per node as JSON."""
    stem.with_suffix(".onnxtxt").write_text(ir.to_onnx_text(model, exclude_initializers=True))
    notes = {}
    for node in model.graph:
        props = {k: json.loads(v) for k, v in node.metadata_props.items() if k.startswith("lamc.")}
        if props:
            notes[node.name or ""] = props
    stem.with_suffix(".lamc.json").write_text(json.dumps(notes, indent=1, sort_keys=True))
