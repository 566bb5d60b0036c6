"""What one optimiser step of pipelined training costs, stage by stage (`lamc train`).

Built on the inference `CostModel` of the workload at the micro-batch's sizes:

- forward: a unit's inference time for one micro-batch;
- backward: the gradient with respect to the unit's inputs always (about one forward: a
  matmul's dX costs what its Y did), and with respect to its weights only for the
  trainable share of its matrix work (another forward's worth for full training; a
  LoRA adapter's few FLOPs otherwise);
- memory: frozen weights + trainable weights, their gradients and the optimiser's state
  + the activations kept for backward, for each micro-batch in flight at the stage. With
  GPipe every stage keeps all `m`; with 1F1B the stage `r` from the end (r = 1 for the
  last) keeps min(m, r);
- links: a cut's activations forward and their gradients back, per micro-batch.

The step time of a pipeline of stages s with work W_s = F_s + B_s and links L_s
(forward + backward transfer of one micro-batch) is the fill and drain plus the steady
state: sum(W) + sum(L) + (m - 1) * max(max W, max L), plus the first stage's optimiser
update (its last backward ends the step; the later stages update in the slack before it).
Both schedules take that time; they differ in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lamc.cost import CostModel

GPIPE = "gpipe"
ONE_F_ONE_B = "1f1b"
SCHEDULES = (ONE_F_ONE_B, GPIPE)
# Optimiser state per trainable parameter, in parameters (AdamW: two moments; SGD with
# momentum: one).
OPTIMISER_STATES = {"adamw": 2, "adam": 2, "sgd": 1}
# Bytes per trainable parameter the update reads and writes (parameter, gradient, states).
_UPDATE_PASSES = 4


@dataclass(frozen=True)
class TrainingSpec:
    method: str  # lora | prompt | full
    micro_batches: int = 8
    schedule: str = ONE_F_ONE_B
    optimiser: str = "adamw"

    def __post_init__(self) -> None:
        if self.method not in ("lora", "prompt", "full"):
            raise ValueError(f"unknown training method {self.method!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}")
        if self.optimiser not in OPTIMISER_STATES:
            raise ValueError(f"unknown optimiser {self.optimiser!r}")
        if self.micro_batches < 1:
            raise ValueError("micro_batches must be at least 1")


@dataclass(frozen=True)
class TrainingMemory:
    """One stage's bytes at its peak, term by term."""

    frozen: float
    trainable: float  # the weights
    gradients: float
    optimiser: float
    activations: float  # kept for backward, all micro-batches in flight
    runtime: float
    capacity: float

    @property
    def total(self) -> float:
        return (
            self.frozen
            + self.trainable
            + self.gradients
            + self.optimiser
            + self.activations
            + self.runtime
        )

    @property
    def headroom(self) -> float:
        return 1.0 - self.total / self.capacity


class TrainingCost:
    """Cost tables of one training step of a workload on a topology.

    `trainable_bytes[u]`: bytes of unit u's trainable parameters (fp32), and
    `trainable_matrix_share[u]`: the share of unit u's matrix FLOPs whose weights train
    (1.0 for full training, 0 for frozen units; adapters' own FLOPs are added on top).
    `saved_bytes[u]`: activation bytes unit u keeps for its backward, per micro-batch.
    """

    def __init__(
        self,
        inference: CostModel,
        spec: TrainingSpec,
        *,
        trainable_bytes: np.ndarray,
        trainable_matrix_share: np.ndarray,
        saved_bytes: np.ndarray,
        adapter_flops: np.ndarray | None = None,
    ) -> None:
        self.inference = inference
        self.spec = spec
        self.devices = inference.devices
        n = inference.n
        self.n = n
        if not (len(trainable_bytes) == len(trainable_matrix_share) == len(saved_bytes) == n):
            raise ValueError("one trainable size, share and saved size per unit")
        units = inference.workload.units
        forward = inference.unit_ms  # [D, n]: one micro-batch
        matrix_share = np.array(
            [u.matrix_flops / u.flops if u.flops else 0.0 for u in units], dtype=np.float64
        )
        extra = np.zeros(n) if adapter_flops is None else np.asarray(adapter_flops, float)
        peak = np.array([[d.peak("fp32") for _ in units] for d in self.devices])
        # Backward: dX (one forward), dW for the trainable share of the matrix work; an
        # adapter's forward and backward FLOPs (3x its forward) at the device's fp32 peak.
        adapter_ms = extra[None, :] / peak * 1000.0
        self.forward_ms = forward + adapter_ms
        self.backward_ms = forward * (1.0 + matrix_share * trainable_matrix_share) + 2 * adapter_ms
        zeros = np.zeros((len(self.devices), 1))
        work = self.forward_ms + self.backward_ms
        self._prefix = np.concatenate([zeros, np.cumsum(work, axis=1)], axis=1)
        self.params = inference._params  # [n+1, n+1] weights of units [j, k), tied once
        trainable = np.concatenate([[0.0], np.cumsum(trainable_bytes)])
        self.trainable = np.maximum(trainable[None, :] - trainable[:, None], 0.0)
        saved = np.concatenate([[0.0], np.cumsum(saved_bytes)])
        self.saved = np.maximum(saved[None, :] - saved[:, None], 0.0)
        self.states = OPTIMISER_STATES[spec.optimiser]

    # ---------------------------------------------------------------- per stage [j, k)

    def work_ms(self, d: int, j: int, k: int) -> float:
        """Forward and backward of one micro-batch of units [j, k) on device d."""
        device = self.devices[d]
        return float(
            2 * device.call_overhead_ms
            + device.training_schedule_overhead_ms
            + self._prefix[d, k]
            - self._prefix[d, j]
        )

    def update_ms(self, d: int, j: int, k: int) -> float:
        """The optimiser's update of the stage's trainable weights (memory bound)."""
        device = self.devices[d]
        moved = self.trainable[j, k] * (_UPDATE_PASSES + self.states)
        return float(1000.0 * moved / device.memory_bandwidth) if moved else 0.0

    def in_flight(self, from_end: int) -> int:
        """Micro-batches whose activations a stage keeps, `from_end` stages from the end
        (1: the last stage)."""
        m = self.spec.micro_batches
        return m if self.spec.schedule == GPIPE else min(m, from_end)

    def memory(self, d: int, j: int, k: int, from_end: int) -> TrainingMemory:
        device = self.devices[d]
        trainable = float(self.trainable[j, k])
        return TrainingMemory(
            frozen=max(float(self.params[j, k]) - trainable, 0.0),
            trainable=trainable,
            gradients=trainable,
            optimiser=trainable * self.states,
            activations=float(self.saved[j, k]) * self.in_flight(from_end),
            runtime=device.training_runtime_bytes,
            capacity=device.memory_bytes,
        )

    def link_ms(self, a: int, b: int, cut: int) -> float:
        """A micro-batch's activations a -> b and their gradients back."""
        forward = self.inference.transfer_ms(a, b, cut)
        backward = self.inference.transfer_ms(b, a, cut)
        return forward + backward

    # ---------------------------------------------------------------- whole tables

    def work_table(self) -> np.ndarray:
        """[D, n+1, n+1]: work_ms of units [j, k) on device d; inf where j >= k."""
        table = np.full((len(self.devices), self.n + 1, self.n + 1), math.inf)
        upper = np.triu_indices(self.n + 1, k=1)
        for d, device in enumerate(self.devices):
            full = (
                self._prefix[d][None, :]
                - self._prefix[d][:, None]
                + 2 * device.call_overhead_ms
                + device.training_schedule_overhead_ms
            )
            table[d][upper] = full[upper]
        return table

    def update_table(self) -> np.ndarray:
        moved = self.trainable * (_UPDATE_PASSES + self.states)
        return np.stack([1000.0 * moved / d.memory_bandwidth for d in self.devices])

    def memory_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """([D, n+1, n+1] bytes a stage needs besides activations, [n+1, n+1] activation
        bytes per micro-batch in flight)."""
        static = self.params + self.trainable * (1 + self.states)
        base = np.stack([static + d.training_runtime_bytes for d in self.devices])
        return base, self.saved

    def link_table(self) -> np.ndarray:
        """[D, D, n+1]: link_ms of cut j between devices a and b (inf: no route)."""
        one_way = self.inference.transfer_table()
        return one_way + one_way.transpose(1, 0, 2)
