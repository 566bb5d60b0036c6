"""Ray Serve deployment of a compiled pipeline (`lamc serve OUT --ray ADDRESS`, extra `lamc[ray]`).

One Serve deployment per stage, each wrapping the same stage runner `lamc serve` uses.
Stage K holds a handle to stage K+1 and hands its outputs straight on (a pipeline, not a
hub); the last stage's answer returns to the caller through the chain of handles.
Between deployments only encoded tensors travel: a `lamc.v1.SubmitRequest` serialised to
bytes, with each edge's codec from the manifest, and replicas decode nothing else.

Resources come from the topology: a stage on a `gpu` device asks Ray for one GPU, every
stage asks for the CPUs of its session's intra-op threads (at least one) and for the
memory the plan predicted for it. The output directory must be readable at the same path
on every Ray node that may host a replica (a shared mount, or a copy); each replica
verifies the manifest's hashes before loading, so a stale copy fails loudly.

Ray's own token authentication guards the cluster (`RAY_AUTH_MODE=token`, with the token
in `RAY_AUTH_TOKEN` or `~/.ray/auth_token`); `deploy` refuses to connect with it off.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lamc.errors import RuntimeEnvironmentError, UsageError
from lamc.manifest import Manifest, StageSpec
from lamc.verify import verify

APP_PREFIX = "lamc-"


def app_name(manifest: Manifest, out: Path) -> str:
    """The Serve application a compiled model deploys as (one per output directory)."""
    name = str(manifest.model.get("name") or out.name)
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
    return f"{APP_PREFIX}{safe}"


def _require_ray() -> tuple[Any, Any]:
    """`ray` and `ray.serve`, or exit 10 naming the extra that installs them."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise RuntimeEnvironmentError(
            f"Ray Serve is not installed here ({exc.name or exc}): --ray needs it",
            hint="pip install 'lamc[ray]'",
        ) from None
    return ray, serve


def _require_token_auth() -> None:
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode != "token":
        raise UsageError(
            "Ray token authentication is off: set RAY_AUTH_MODE=token and the cluster's "
            "token in RAY_AUTH_TOKEN (or ~/.ray/auth_token) before deploying"
        )


def stage_resources(spec: StageSpec) -> dict[str, Any]:
    """Ray actor options for one stage, from its device kind and the plan's prediction."""
    threads = int(spec.session.get("threads", 0) or 0)
    options: dict[str, Any] = {"num_cpus": max(1, threads)}
    uses_gpu = spec.kind == "gpu" and any(p != "CPUExecutionProvider" for p in spec.providers)
    if uses_gpu:
        options["num_gpus"] = 1
    memory = float(spec.predicted.get("memory_bytes", 0.0))
    if memory > 0:
        options["memory"] = int(memory)
    return options


def _encode(tensors: Mapping[str, np.ndarray], codecs: Mapping[str, str]) -> bytes:
    from lamc.runtime import wire

    request = wire.SubmitRequest()
    for name, value in tensors.items():
        request.tensors.append(wire.encode(name, value, codecs.get(name, "raw")))
    data: bytes = request.SerializeToString()
    return data


def _decode(payload: bytes, where: str) -> dict[str, np.ndarray]:
    from lamc.runtime import wire

    if not isinstance(payload, bytes):
        raise TypeError(f"{where}: expected encoded tensors (bytes), got {type(payload).__name__}")
    request = wire.SubmitRequest()
    request.ParseFromString(payload)
    return {t.name: wire.decode(t) for t in request.tensors}


class StageDeployment:
    """The body of each stage's Serve deployment (wrapped by `serve.deployment` at deploy
    time so that importing this module never needs Ray)."""

    def __init__(
        self,
        out: str,
        index: int,
        providers: Sequence[str] | None,
        next_stage: Any = None,
    ) -> None:
        from lamc.runtime.executor import load_stage
        from lamc.runtime.tensors import check_all

        self._check_all = check_all
        self.out = Path(out)
        self.manifest = verify(self.out)
        self.spec = self.manifest.stages[index]
        self.stage = load_stage(self.out, self.spec, providers=providers)
        self.next_stage = next_stage
        edge = next((e for e in self.manifest.edges if e.source == index), None)
        self.codecs = {t.name: t.codec for t in edge.tensors} if edge else {}
        self.where = f"stage {index} ({self.spec.device}) on Ray Serve"

    async def __call__(self, payload: bytes) -> bytes:
        manifest, spec = self.manifest, self.spec
        binding: dict[str, int] = {}
        arriving = self._check_all(
            spec.receives,
            manifest.tensors,
            _decode(payload, self.where),
            manifest.dims,
            binding,
            f"{self.where} input",
        )
        produced = self.stage.run(arriving)
        sends = {
            name: produced[name] if name in produced else arriving[name] for name in spec.sends
        }
        encoded = _encode(sends, self.codecs)
        if self.next_stage is None:
            return encoded
        result: bytes = await self.next_stage.remote(encoded)
        return result


def deploy(
    out: Path,
    address: str,
    *,
    providers: Sequence[str] | None = None,
    name: str | None = None,
) -> list[str]:
    """Deploy every stage of `out` on the Ray cluster at `address`; returns the deployment
    names, first stage (the application's ingress) first."""
    ray, serve = _require_ray()

    _require_token_auth()
    out = Path(out)
    manifest = verify(out)
    app = name or app_name(manifest, out)
    try:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ... by version
        raise RuntimeEnvironmentError(f"cannot reach the Ray cluster at {address}: {exc}") from None
    serve.start(proxy_location="Disabled")
    bound: Any = None
    names = []
    for spec in reversed(manifest.stages):
        deployment_name = f"stage{spec.index}"
        names.append(deployment_name)
        deployment = serve.deployment(
            name=deployment_name,
            num_replicas=1,
            ray_actor_options=stage_resources(spec),
        )(StageDeployment)
        bound = deployment.bind(
            str(out.resolve()), spec.index, list(providers) if providers else None, bound
        )
    serve.run(bound, name=app, route_prefix=None, blocking=False)
    return list(reversed(names))


class RayPipeline:
    """Client of a pipeline deployed with `deploy`: the same `run(feeds)` as `Pipeline`."""

    def __init__(self, out: Path, address: str, *, timeout_s: float = 30.0) -> None:
        ray, serve = _require_ray()

        _require_token_auth()
        self.out = Path(out)
        self.manifest = verify(self.out)
        self.timeout_s = timeout_s
        self.addresses = [address]
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        except Exception as exc:
            raise RuntimeEnvironmentError(
                f"cannot reach the Ray cluster at {address}: {exc}"
            ) from None
        self.app = app_name(self.manifest, self.out)
        try:
            self.handle = serve.get_app_handle(self.app)
        except Exception as exc:
            raise RuntimeEnvironmentError(
                f"no Serve application {self.app!r} on {address} (deploy it with `lamc serve "
                f"{self.out} --ray {address}`): {exc}"
            ) from None
        edge = next((e for e in self.manifest.edges if e.source == -1), None)
        self.codecs = {t.name: t.codec for t in edge.tensors} if edge else {}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from lamc.runtime.tensors import check_all

        manifest = self.manifest
        unknown = sorted(set(feeds) - set(manifest.inputs))
        if unknown:
            raise UsageError(
                f"input: unknown tensor(s) {', '.join(unknown)}; the model takes {', '.join(manifest.inputs)}"
            )
        checked = check_all(manifest.inputs, manifest.tensors, feeds, manifest.dims, {}, "input")
        first = manifest.stages[0].receives
        response = self.handle.remote(_encode({n: checked[n] for n in first}, self.codecs))
        try:
            payload = response.result(timeout_s=self.timeout_s)
        except TimeoutError:
            raise RuntimeEnvironmentError(
                f"{self.app}: no answer within {self.timeout_s:g} s"
            ) from None
        except Exception as exc:
            raise RuntimeEnvironmentError(f"{self.app}: {exc}") from None
        outputs = _decode(payload, self.app)
        return {name: outputs[name] for name in manifest.outputs}

    def close(self) -> None:
        pass
