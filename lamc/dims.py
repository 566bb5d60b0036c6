"""Symbolic dimensions: `batch`, `seq`, `past + seq`, `2*seq`, evaluated under a binding.

Pure Python (ast only), shared by the compiler and the edge executor.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping


class UnresolvedDim(ValueError):
    """A symbolic dimension that the binding cannot evaluate."""


_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_EXPR_CACHE: dict[str, ast.expr] = {}


def eval_dim(dim: object, binding: Mapping[str, int]) -> int:
    """Evaluate one dimension (`seq`, `past + seq`, `2*seq`, `(s0//2)`) under `binding`.

    `dim` is an int, a string, or anything with a `.value` string (onnx_ir's SymbolicDim)."""
    if isinstance(dim, int):
        return dim
    text = dim if isinstance(dim, str) or dim is None else getattr(dim, "value", None)
    if text is None:
        raise UnresolvedDim("unknown dimension")
    if text in binding:
        return int(binding[text])
    expr = _EXPR_CACHE.get(text)
    if expr is None:
        try:
            expr = ast.parse(
                text.replace("CeilToInt", "").replace("IntTrueDiv", ""), mode="eval"
            ).body
        except SyntaxError as exc:
            raise UnresolvedDim(f"cannot parse dimension {text!r}") from exc
        _EXPR_CACHE[text] = expr
    return _eval(expr, binding, text)


def _eval(node: ast.expr, binding: Mapping[str, int], text: str) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in binding:
            raise UnresolvedDim(f"dimension {text!r} uses {node.id!r}, which has no value")
        return int(binding[node.id])
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return int(
            _BINOPS[type(node.op)](
                _eval(node.left, binding, text), _eval(node.right, binding, text)
            )
        )
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand, binding, text)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("Max", "Min", "max", "min")
    ):
        args = [_eval(a, binding, text) for a in node.args]
        return max(args) if node.func.id.lower() == "max" else min(args)
    raise UnresolvedDim(f"cannot evaluate dimension {text!r}")


def names_in(text: str) -> set[str]:
    """The symbol names a dimension expression uses."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return set()
    return {
        n.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Name) and n.id not in ("Max", "Min", "max", "min")
    }
