"""Partitionable units: the repeated blocks of a model plus the glue between them.

A block is an instance of a module class that occurs at least twice and covers a large
share of the graph (each transformer block, each residual bottleneck). The classes are
picked greedily by how many nodes their instances cover. Nodes outside every block form
glue units: maximal runs between blocks in topological order (the embedding, the stem,
the head). Constant-only subgraphs belong to no unit: each stage that needs one gets its
own copy when sliced, so their outputs never cross a cut.

When the IR carries no module scopes and no `name.N` paths, the graph is cut into
segments at single-tensor boundaries instead.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import networkx as nx
import onnx_ir as ir

from lamc.errors import InternalError
from lamc.ir import (
    CONST,
    COST,
    UNIT,
    UnresolvedDim,
    annotate,
    annotation,
    eval_shape,
    itemsize,
    node_inputs,
    numel,
    subgraph_users,
)
from lamc.passes.base import Pass, PassResult
from lamc.passes.unit_groups import group_by_blocks, group_by_segments
from lamc.workload import Cut, CutTensor, OpWork, Unit, Workload

# block: each repeated block is a unit; fine: each child module of a block is (cuts can then
# fall inside a block, across its skip connection).
GRANULARITIES = ("block", "fine")


class BuildUnits(Pass):
    """Groups the analysed IR into units and stores the `Workload` in `model.meta`."""

    def __init__(
        self, name: str = "model", max_segments: int = 32, granularity: str = "block"
    ) -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}")
        self.model_name = name
        self.max_segments = max_segments
        self.granularity = granularity

    def requires(self, model: ir.Model) -> None:
        for node in model.graph:
            if annotation(node, COST) is None:
                raise InternalError("BuildUnits needs the Analyze pass first")

    def call(self, model: ir.Model) -> PassResult:
        model.meta["lamc.workload"] = build_workload(
            model, self.model_name, self.max_segments, self.granularity
        )
        return PassResult(model, modified=True)


def build_workload(
    model: ir.Model, name: str, max_segments: int = 32, granularity: str = "block"
) -> Workload:
    graph = model.graph
    nodes = list(graph)
    position = {id(n): i for i, n in enumerate(nodes)}
    users = subgraph_users(nodes)
    const = _constant_nodes(nodes)
    active = [n for n in nodes if id(n) not in const]

    groups = group_by_blocks(active, fine=granularity == "fine")
    if groups is None:
        groups = group_by_segments(active, model, max_segments, users)

    # Unit DAG over the groups; merge strongly connected groups (blocks that interleave).
    group_of = {id(n): g for g, members in enumerate(groups) for n in members}
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(groups)))
    for node in active:
        for value in node.outputs:
            for user in users(value):
                target = group_of.get(id(user))
                if target is not None and target != group_of[id(node)]:
                    dag.add_edge(group_of[id(node)], target)
    condensed = nx.condensation(dag)
    merged: list[list[ir.Node]] = []
    first_pos: list[int] = []
    for scc in condensed.nodes:
        members = sorted(
            (n for g in condensed.nodes[scc]["members"] for n in groups[g]),
            key=lambda n: position[id(n)],
        )
        merged.append(members)
        first_pos.append(position[id(members[0])])
    order = list(nx.lexicographical_topological_sort(condensed, key=lambda c: first_pos[c]))
    units_nodes = [merged[c] for c in order]

    unit_of: dict[int, int] = {}
    for index, members in enumerate(units_nodes):
        for node in members:
            unit_of[id(node)] = index
    # Constant-only nodes are costed with the first unit that uses them.
    for node in reversed(nodes):
        if id(node) in const:
            using = [unit_of[id(u)] for v in node.outputs for u in users(v) if id(u) in unit_of]
            unit_of[id(node)] = min(using) if using else 0
    for node in nodes:
        annotate(node, UNIT, unit_of[id(node)])
        if id(node) in const:
            annotate(node, CONST, True)

    binding = _binding(model)
    concrete: Mapping[str, tuple[int, ...]] = model.meta.get("lamc.concrete_shapes", {})
    n_units = len(units_nodes)
    value_bytes = _ValueBytes(binding, concrete)

    # Live ranges over the units' order: a value is born at its producer and dies at its
    # last user; model inputs are born before unit 0, model outputs die after the last unit.
    virtual = sorted(
        (n for n in nodes if id(n) not in const), key=lambda n: (unit_of[id(n)], position[id(n)])
    )
    vpos = {id(n): i for i, n in enumerate(virtual)}
    end = len(virtual)
    graph_outputs = {id(v) for v in graph.outputs}
    live_delta = [0] * (end + 2)
    cut_members: list[list[CutTensor]] = [[] for _ in range(n_units + 1)]
    edges: dict[tuple[int, int], int] = defaultdict(int)

    def track(value: ir.Value, producer_unit: int, birth: int) -> None:
        consumers = [u for u in users(value) if id(u) not in const]
        consumer_units = [unit_of[id(u)] for u in consumers]
        death = max((vpos[id(u)] for u in consumers), default=birth)
        last_unit = max(consumer_units, default=producer_unit)
        if id(value) in graph_outputs:
            death, last_unit = end, n_units
        size = value_bytes(value)
        live_delta[birth] += size
        live_delta[death + 1] -= size
        tensor = CutTensor(
            value.name or "", _dtype_name(value.dtype), _shape_text(value.shape), size
        )
        for k in range(producer_unit + 1, last_unit + 1):
            cut_members[k].append(tensor)
        for c in set(consumer_units):
            if c != producer_unit and producer_unit >= 0:
                edges[(producer_unit, c)] += size

    for value in graph.inputs:
        track(value, -1, 0)
    for node in virtual:
        for value in node.outputs:
            track(value, unit_of[id(node)], vpos[id(node)])

    live = []
    running = 0
    for i in range(end):
        running += live_delta[i]
        live.append(running)

    units: list[Unit] = []
    param_users: dict[str, set[int]] = defaultdict(set)
    param_size: dict[str, int] = {}
    for index, members in enumerate(units_nodes):
        # Constant-only nodes are folded when the runtime loads the model: they cost no
        # time per run, and what they produce is stored like a weight.
        costed = members
        params: set[str] = set()
        for node in costed:
            for inp in node_inputs(node):  # a subgraph's weights are its node's
                producer = inp.producer()
                if inp.is_initializer() and inp.const_value is not None:
                    params.add(inp.name or "")
                    param_size[inp.name or ""] = int(inp.const_value.nbytes)
                elif producer is not None and id(producer) in const:
                    params.add(inp.name or "")
                    param_size[inp.name or ""] = value_bytes(inp)
        for p in params:
            param_users[p].add(index)
        costs = [annotation(n, COST) for n in costed]
        const_costs = [
            annotation(n, COST) for n in nodes if id(n) in const and unit_of[id(n)] == index
        ]
        span = [vpos[id(n)] for n in members]
        name_, kind, cls = _describe(members)
        units.append(
            Unit(
                index=index,
                name=name_,
                kind=kind,
                module_class=cls,
                nodes=len(costed) + len(const_costs),
                flops=float(sum(c.flops for c in costs)),
                matrix_flops=float(
                    sum(c.matrix_flops for c in costs) + sum(c.matrix_flops for c in const_costs)
                ),
                param_bytes=sum(param_size[p] for p in params),
                peak_activation_bytes=max(
                    (live[i] for i in range(min(span), max(span) + 1)), default=0
                ),
                ops=tuple(
                    OpWork(
                        c.op_class,
                        c.flops,
                        float(c.moved_bytes),
                        c.dtype,
                        float(c.weight_read_bytes),
                    )
                    for c in costs
                ),
                params=tuple(sorted(params)),
            )
        )
    units = _unique_names(units)
    shared = {
        p: (param_size[p], tuple(sorted(users)))
        for p, users in sorted(param_users.items())
        if len(users) > 1
    }
    cuts = tuple(
        Cut(k, tuple(sorted(members, key=lambda t: t.name)))
        for k, members in enumerate(cut_members)
    )
    return Workload(
        name=name,
        binding=binding,
        units=tuple(units),
        cuts=cuts,
        shared_params=shared,
        edges=dict(sorted(edges.items())),
    )


def _constant_nodes(nodes: list[ir.Node]) -> set[int]:
    """Nodes computed from initializers and constants alone (no model input reaches them)."""
    const: set[int] = set()
    for node in nodes:
        if any(
            isinstance(a, ir.Attr) and a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for a in node.attributes.values()
        ):
            continue
        ok = True
        for value in node.inputs:
            if value is None or value.is_initializer():
                continue
            producer = value.producer()
            if producer is None or id(producer) not in const:
                ok = False
                break
        if ok and node.outputs and not any(v.is_graph_output() for v in node.outputs):
            const.add(id(node))
    return const


def _describe(members: list[ir.Node]) -> tuple[str, str, str | None]:
    block = next((n.meta.get("lamc.block") for n in members if n.meta.get("lamc.block")), None)
    if block is not None:
        path, key = block
        if key == "part":
            return path, "part", None
        cls = key.rsplit(".", 1)[-1] if key and not key.endswith(".*") else None
        return path, "block", cls
    tops: list[str] = []
    for node in members:
        paths = annotation(node, "lamc.scope", []) or []
        top = paths[0] if paths else ""
        if top and top not in tops:
            tops.append(top)
    if not tops:
        return "glue", "glue", None
    name = "+".join(tops[:3]) + ("+..." if len(tops) > 3 else "")
    return name, "glue", None


def _unique_names(units: list[Unit]) -> list[Unit]:
    seen: dict[str, int] = {}
    result = []
    from dataclasses import replace

    for unit in units:
        count = seen.get(unit.name, 0)
        seen[unit.name] = count + 1
        result.append(unit if count == 0 else replace(unit, name=f"{unit.name}#{count}"))
    return result


class _ValueBytes:
    def __init__(self, binding: Mapping[str, int], concrete: Mapping[str, tuple[int, ...]]) -> None:
        self.binding = binding
        self.concrete = concrete

    def __call__(self, value: ir.Value) -> int:
        try:
            shape = eval_shape(value.shape, self.binding)
        except UnresolvedDim:
            found = self.concrete.get(value.name or "")
            if found is None:
                return 0
            shape = found
        return int(numel(shape) * itemsize(value.dtype))


def _binding(model: ir.Model) -> dict[str, int]:
    summary = model.meta.get("lamc.analysis")
    return dict(summary.binding) if summary is not None else {}


def _dtype_name(dtype: ir.DataType | None) -> str:
    return dtype.name.lower() if dtype is not None else "undefined"


def _shape_text(shape: ir.Shape | None) -> tuple[int | str, ...]:
    if shape is None:
        return ()
    return tuple(d if isinstance(d, int) else (d.value or "?") for d in shape.dims)
