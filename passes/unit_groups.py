"""How nodes group into partitionable units: by repeated module blocks (a transformer's
layers, a ResNet's stages), and, for graphs without module scopes, by segments of the
node order."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable

import onnx_ir as ir

from lamc.ir import COST, annotation

_INDEXED = re.compile(r"^(.*)\.(\d+)$")


def _class_key(path: str, cls: str | None) -> str | None:
    if cls is not None:
        return cls
    m = _INDEXED.match(path)
    return f"{m.group(1)}.*" if m else None


def _is_within(path: str, other: str) -> bool:
    return path == other or path.startswith(other + ".")


def group_by_blocks(active: list[ir.Node], fine: bool = False) -> list[list[ir.Node]] | None:
    """Groups by repeated module instances, with glue runs between them; None if no blocks."""
    scopes: list[list[tuple[str, str | None]]] = []
    coverage: dict[str, set[int]] = defaultdict(set)
    instances: dict[str, set[str]] = defaultdict(set)
    for i, node in enumerate(active):
        paths = annotation(node, "lamc.scope", []) or []
        classes = node.meta.get("lamc.scope_classes") or (None,) * len(paths)
        keyed = []
        for path, cls in zip(paths, classes):
            key = _class_key(path, cls)
            keyed.append((path, key))
            if key is not None:
                coverage[key].add(i)
                instances[key].add(path)
        scopes.append(keyed)

    total = max(len(active), 1)
    chosen: list[str] = []
    chosen_paths: set[str] = set()
    covered: set[int] = set()

    def valid(key: str) -> bool:
        paths = instances[key]
        if len(paths) < 2 or any(_is_within(a, b) for a in paths for b in paths if a != b):
            return False
        return not any(_is_within(a, b) or _is_within(b, a) for a in paths for b in chosen_paths)

    while True:
        gains = {k: len(coverage[k] - covered) for k in coverage if k not in chosen and valid(k)}
        threshold = (0.10 if not chosen else 0.05) * total
        gains = {k: g for k, g in gains.items() if g >= threshold}
        if not gains:
            break
        # Layers first: a class whose every instance is a member of a module list
        # (`encoder.layers.3`). An encoder-decoder's encoder and decoder layers are two
        # classes, each covering less than the attention class they share; its layers
        # are still the cut points, not their attention and norms.
        layers = {k: g for k, g in gains.items() if all(map(_INDEXED.match, instances[k]))}
        gains = layers or gains
        # Among classes covering nearly as much as the best, the one with the most
        # instances gives the partitioner the most cut points (Bottleneck, not layer1..4).
        best = max(gains.values())
        key = max(
            (k for k, g in gains.items() if g >= 0.9 * best),
            key=lambda k: (len(instances[k]), gains[k], k),
        )
        chosen.append(key)
        chosen_paths |= instances[key]
        covered |= coverage[key]
    if not chosen:
        return None

    groups: list[list[ir.Node]] = []
    block_group: dict[str, int] = {}
    inner_glue: dict[str, list[int]] = {}
    glue_open: int | None = None
    for node, keyed in zip(active, scopes):
        block = next((path for path, _ in keyed if path in chosen_paths), None)
        if block is None:
            if glue_open is None:
                groups.append([])
                glue_open = len(groups) - 1
            groups[glue_open].append(node)
            node.meta["lamc.block"] = None
            continue
        glue_open = None
        if fine:
            _fine_group(node, keyed, block, groups, block_group, inner_glue)
            continue
        if block not in block_group:
            groups.append([])
            block_group[block] = len(groups) - 1
        groups[block_group[block]].append(node)
        node.meta["lamc.block"] = (block, next(key for path, key in keyed if path == block))
    return groups


def _fine_group(
    node: ir.Node,
    keyed: list[tuple[str, str | None]],
    block: str,
    groups: list[list[ir.Node]],
    child_group: dict[str, int],
    inner_glue: dict[str, list[int]],
) -> None:
    """Finer units: runs of a block's child modules (conv1, attn, mlp) and of the block's
    own ops between them (a residual add). A module called twice (one ReLU used after every
    conv) gives a unit per contiguous run, so units stay in order."""
    paths = [path for path, _ in keyed]
    depth = paths.index(block)
    child = paths[depth + 1] if depth + 1 < len(paths) else None
    runs = inner_glue.setdefault(block, [])
    key = child if child is not None else f"{block}.~"
    current = child_group.get(f"@current:{block}")
    if current is None or groups[current][-1].meta.get("lamc.fine_key") != key:
        groups.append([])
        current = len(groups) - 1
        child_group[f"@current:{block}"] = current
        runs.append(current)
    groups[current].append(node)
    node.meta["lamc.fine_key"] = key
    node.meta["lamc.block"] = (child if child is not None else f"{block}.~", "part")


def group_by_segments(
    active: list[ir.Node],
    model: ir.Model,
    max_segments: int,
    users: Callable[[ir.Value], list[ir.Node]],
) -> list[list[ir.Node]]:
    """No scopes: cut the topological order where few tensors are live (a block boundary
    of a repeated stack: the residual stream, plus what every block reads, such as the
    attention mask), into segments of roughly equal FLOPs. Tensors used inside a
    node's subgraphs (an If's branches) live until that node (`users`:
    `lamc.ir.subgraph_users`)."""
    position = {id(n): i for i, n in enumerate(active)}

    def last_use(value: ir.Value, born: int) -> int:
        return max((position[id(u)] for u in users(value) if id(u) in position), default=born)

    ends = {id(v): last_use(v, -1) for v in model.graph.inputs}
    ends |= {id(v): last_use(v, position[id(n)]) for n in active for v in n.outputs}
    # How many tensors cross a cut after each node.
    crossing: list[int] = []
    live = {id(v): ends[id(v)] for v in model.graph.inputs if ends[id(v)] >= 0}
    for i, node in enumerate(active):
        for value in node.outputs:
            live[id(value)] = ends[id(value)]
        live = {v: d for v, d in live.items() if d > i}
        crossing.append(len(live))
    # Candidate cuts: where fewest tensors cross among the positions around (a stack's
    # block boundaries, where only the residual stream and what every block reads do).
    reach = max(1, len(active) // (4 * max_segments))
    inner = [*crossing[:-1], len(active)]  # nothing crosses after the last node
    candidate = [
        0 < count <= min(inner[max(0, i - reach) : i + reach + 1])
        for i, count in enumerate(crossing)
    ]
    total_flops = sum(annotation(n, COST).flops for n in active) or 1.0
    target = total_flops / max_segments
    groups: list[list[ir.Node]] = [[]]
    acc = 0.0
    for i, node in enumerate(active):
        groups[-1].append(node)
        acc += annotation(node, COST).flops
        if acc >= target and candidate[i] and i + 1 < len(active):
            groups.append([])
            acc = 0.0
    return [g for g in groups if g]
