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
from collections.abc import Callable, Mapping

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
from lamc.workload import Cut, CutTensor, Flow, OpWork, Unit, Workload

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
    position: dict[int, float] = {id(n): i for i, n in enumerate(nodes)}
    users = subgraph_users(nodes)
    const = _constant_nodes(nodes)
    active = [n for n in nodes if id(n) not in const]

    groups = group_by_blocks(active, fine=granularity == "fine")
    if groups is None:
        groups = group_by_segments(active, model, max_segments, users)
    else:
        groups = split_glue(groups, users)

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
        first_pos.append(int(position[id(members[0])]))
    order = list(nx.lexicographical_topological_sort(condensed, key=lambda c: first_pos[c]))
    units_nodes = [merged[c] for c in order]

    unit_of: dict[int, int] = {}
    for index, members in enumerate(units_nodes):
        for node in members:
            unit_of[id(node)] = index
    if _own_shape_values(graph, units_nodes, unit_of, position, const, users):
        # Sizes no unit reads any more are dropped, and units left empty with them.
        _drop_dead_sizes(graph, units_nodes)
        units_nodes = [members for members in units_nodes if members]
        unit_of = {id(n): index for index, members in enumerate(units_nodes) for n in members}
        nodes = list(graph)
        users = subgraph_users(nodes)
    # Constant-only nodes are costed with the first unit that uses them.
    for node in reversed(nodes):
        if id(node) in const:
            using = [unit_of[id(u)] for v in node.outputs for u in users(v) if id(u) in unit_of]
            unit_of[id(node)] = min(using) if using else 0
    for node in nodes:
        annotate(node, UNIT, unit_of[id(node)])
        if id(node) in const:
            annotate(node, CONST, True)

    _local_shape_reads(graph, nodes, unit_of, const)
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
    flows: dict[str, Flow] = {}

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
        if tensor.name:
            flows[tensor.name] = Flow(
                tensor,
                producer_unit,
                tuple(sorted(set(consumer_units) - {producer_unit})),
                id(value) in graph_outputs,
            )
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
        flows=flows,
    )


# Ops a dim size is computed with (from `Shape` of a model input): cheap enough to compute
# again wherever a size is needed.
_SHAPE_OPS = frozenset(
    {"Shape", "Squeeze", "Unsqueeze", "Gather", "Slice", "Concat", "Cast", "Reshape",
     "Identity", "Add", "Sub", "Mul", "Div", "Max", "Min"}
)  # fmt: skip
_SHAPE_CONE = 8  # nodes at most


def _shape_cone(value: ir.Value, const: set[int]) -> list[ir.Node] | None:
    """The nodes that compute `value` from the shapes of model inputs and constants only
    (None if anything else feeds it, or it takes more than a few nodes)."""
    cone: list[ir.Node] = []
    seen: set[int] = set()
    stack = [value]
    while stack:
        current = stack.pop()
        if current.is_initializer():
            continue
        node = current.producer()
        if node is None or id(node) in const:
            if node is None:
                return None  # a model input read for its values
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type not in _SHAPE_OPS or node.domain not in ("", "ai.onnx"):
            return None
        cone.append(node)
        if len(cone) > _SHAPE_CONE:
            return None
        if node.op_type == "Shape":
            source = node.inputs[0]
            if source is None or not source.is_graph_input():
                return None
            continue
        stack.extend(v for v in node.inputs if v is not None)
    return cone


def _own_shape_values(
    graph: ir.Graph,
    units_nodes: list[list[ir.Node]],
    unit_of: dict[int, int],
    position: dict[int, float],
    const: set[int],
    users: Callable[[ir.Value], list[ir.Node]],
) -> bool:
    """A dim size (the batch, from `Shape` of an input) that the exporter computed once and
    every unit reads is computed again in each unit that reads it, so that units of
    independent branches do not depend on each other for a size. Returns whether the
    graph changed."""
    # Which units each unit depends on for data (sizes aside): a unit downstream of the
    # one computing a size keeps reading it from there.
    sizes: dict[int, bool] = {}

    def is_size(value: ir.Value) -> bool:
        if id(value) not in sizes:
            sizes[id(value)] = _shape_cone(value, const) is not None
        return sizes[id(value)]

    ancestors: list[set[int]] = []
    for unit, members in enumerate(units_nodes):
        found: set[int] = set()
        for node in members:
            for value in node_inputs(node):
                producer = value.producer()
                if producer is None or id(producer) not in unit_of:
                    continue
                other = unit_of[id(producer)]
                if other != unit and other < unit and not is_size(value):
                    found |= {other, *ancestors[other]}
        ancestors.append(found)
    changed = False
    made: list[int] = []  # one entry per copy of a cone (its names' serial number)
    for members in list(units_nodes):
        for node in list(members):
            if node.op_type not in _SHAPE_OPS:
                continue
            home = unit_of[id(node)]
            for value in node.outputs:
                readers = [
                    u
                    for u in users(value)
                    if unit_of.get(id(u), home) != home and home not in ancestors[unit_of[id(u)]]
                ]
                if not readers or value.is_graph_output():
                    continue
                cone = _shape_cone(value, const)
                if cone is None:
                    continue
                cone.sort(key=lambda n: position[id(n)])
                by_unit: dict[int, list[ir.Node]] = {}
                for reader in readers:
                    by_unit.setdefault(unit_of[id(reader)], []).append(reader)
                cloned: dict[int, ir.Value] = {}  # unit -> its copy of the size
                for unit, readers_here in sorted(by_unit.items()):
                    upstream = [w for w in cloned if w in ancestors[unit]]
                    if upstream:  # a unit before it in its branch computes it already
                        new_value = cloned[upstream[0]]
                    else:
                        anchor = min(readers_here, key=lambda n: position[id(n)])
                        copies = _clone_cone(graph, cone, anchor, f"u{unit}c{len(made)}")
                        made.append(unit)
                        for n in copies.values():
                            unit_of[id(n)] = unit
                            position[id(n)] = position[id(anchor)] - 0.5
                            units_nodes[unit].append(n)
                        new_value = copies[id(node)].outputs[list(node.outputs).index(value)]
                        cloned[unit] = new_value
                    for reader in readers_here:
                        for i, inp in enumerate(reader.inputs):
                            if inp is value:
                                reader.replace_input_with(i, new_value)
                    changed = True
    if changed:
        for members in units_nodes:
            members.sort(key=lambda n: position[id(n)])
    return changed


def _drop_dead_sizes(graph: ir.Graph, units_nodes: list[list[ir.Node]]) -> None:
    """Remove size computations whose every value lost its last reader to a copy."""
    while True:
        dead = [
            node
            for members in units_nodes
            for node in members
            if node.op_type in _SHAPE_OPS
            and not any(v.uses() or v.is_graph_output() for v in node.outputs)
        ]
        if not dead:
            return
        gone = {id(n) for n in dead}
        for members in units_nodes:
            members[:] = [n for n in members if id(n) not in gone]
        for node in dead:
            graph.remove(node, safe=True)


def _clone_cone(
    graph: ir.Graph, cone: list[ir.Node], anchor: ir.Node, tag: str
) -> dict[int, ir.Node]:
    """Copies of `cone` (in graph order) inserted before `anchor`, their names suffixed
    with `tag`: old node id -> copy."""
    mapping: dict[int, ir.Value] = {}
    copies: dict[int, ir.Node] = {}
    for node in cone:
        inputs = [mapping.get(id(v), v) if v is not None else None for v in node.inputs]
        copy = ir.Node(
            node.domain,
            node.op_type,
            inputs,
            list(node.attributes.values()),
            num_outputs=len(node.outputs),
            name=f"{node.name}_{tag}",
            metadata_props=dict(node.metadata_props),
        )
        copy.meta.update(node.meta)
        for old, new in zip(node.outputs, copy.outputs):
            new.name = f"{old.name}_{tag}"
            new.dtype = old.dtype  # type: ignore[assignment]
            new.shape = old.shape
            mapping[id(old)] = new
        graph.insert_before(anchor, copy)
        copies[id(node)] = copy
    return copies


def _local_shape_reads(
    graph: ir.Graph, nodes: list[ir.Node], unit_of: dict[int, int], const: set[int]
) -> None:
    """A unit that reads a model input only for the size of a dim it shares by name with
    an input the unit reads anyway (the exporter takes `batch` from whichever input came
    first) reads that size from its own input instead. Otherwise a camera tower would
    need the microphone's samples just to learn the batch size, and branches that are
    independent would not be."""
    inputs = {id(v): v for v in graph.inputs}
    direct: dict[int, set[int]] = defaultdict(set)  # unit -> inputs it reads for values
    before: dict[int, set[int]] = defaultdict(set)  # unit -> units it reads from
    for node in nodes:
        if id(node) in const or node.op_type == "Shape":
            continue
        here = unit_of[id(node)]
        for value in node_inputs(node):
            producer = value.producer()
            if id(value) in inputs:
                direct[here].add(id(value))
            elif (
                producer is not None and id(producer) not in const and unit_of[id(producer)] != here
            ):
                before[here].add(unit_of[id(producer)])
    # The inputs a unit's values come from, itself or through the units before it: a
    # size is best read from an input the unit reads, else from one its branch reads.
    reach: dict[int, set[int]] = {}
    for unit in sorted(set(unit_of.values())):
        reach[unit] = set(direct[unit]).union(*(reach.get(p, set()) for p in before[unit]))
    for node in nodes:
        if node.op_type != "Shape" or node.domain not in ("", "ai.onnx") or id(node) in const:
            continue
        source = node.inputs[0]
        if source is None or id(source) not in inputs or source.shape is None:
            continue
        unit = unit_of[id(node)]
        if id(source) in direct[unit]:
            continue
        rank = len(source.shape)
        start_attr, end_attr = node.attributes.get("start"), node.attributes.get("end")
        start = start_attr.as_int() if start_attr is not None else 0
        end = end_attr.as_int() if end_attr is not None else rank
        start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
        if end != start + 1 or not 0 <= start < rank:
            continue
        name = source.shape[start]
        if not isinstance(name, ir.SymbolicDim) or name.value is None:
            continue
        candidates = [
            *sorted(direct[unit], key=lambda i: inputs[i].name or ""),
            *sorted(reach[unit] - direct[unit], key=lambda i: inputs[i].name or ""),
        ]
        if id(source) in reach[unit]:
            continue  # the branch reads this input anyway
        for other_id in candidates:
            other = inputs[other_id]
            dims = list(other.shape) if other.shape is not None else []
            axis = next(
                (
                    j
                    for j, d in enumerate(dims)
                    if isinstance(d, ir.SymbolicDim) and d.value == name.value
                ),
                None,
            )
            if axis is None:
                continue
            node.replace_input_with(0, other)
            node.attributes["start"] = ir.AttrInt64("start", axis)
            node.attributes["end"] = ir.AttrInt64("end", axis + 1)
            break


def split_glue(
    groups: list[list[ir.Node]], users: Callable[[ir.Value], list[ir.Node]]
) -> list[list[ir.Node]]:
    """Glue between blocks of independent branches (a vision tower's last norm and an
    audio tower's first convolution, in one run of the node order) split into one unit per
    branch, so that the towers stay apart. Glue nodes stay together when data flows
    between them or when they read from or feed the same other unit (a mask and the
    embeddings both feeding the first layer). Both feeding a glue unit (the fusion after
    the towers) does not hold them together."""
    group_of = {
        id(n): g
        for g, members in enumerate(groups)
        if any(m.meta.get("lamc.block") for m in members)
        for n in members
    }
    result: list[list[ir.Node]] = []
    for members in groups:
        if len(members) < 2 or any(n.meta.get("lamc.block") for n in members):
            result.append(members)
            continue
        parent = list(range(len(members)))
        find = _finder(parent)
        index = {id(n): i for i, n in enumerate(members)}
        anchor: dict[int, int] = {}  # a block -> the first member touching it
        for i, node in enumerate(members):
            touched: list[int] = []
            for value in node.outputs:
                for user in users(value):
                    if id(user) in index:
                        parent[find(index[id(user)])] = find(i)
                    elif id(user) in group_of:
                        touched.append(group_of[id(user)])
            for value in node_inputs(node):
                producer = value.producer()
                if producer is None:
                    continue
                if id(producer) in index:
                    parent[find(index[id(producer)])] = find(i)
                elif id(producer) in group_of:
                    touched.append(group_of[id(producer)])
            for other in touched:
                if other in anchor:
                    parent[find(i)] = find(anchor[other])
                else:
                    anchor[other] = i
        parts: dict[int, list[ir.Node]] = {}
        for i, node in enumerate(members):
            parts.setdefault(find(i), []).append(node)
        result.extend(parts.values())
    return result


def _finder(parent: list[int]) -> Callable[[int], int]:
    """Union-find's `find` over `parent` (with path halving)."""

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    return find


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
