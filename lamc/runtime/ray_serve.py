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

Callers reach the pipeline three ways:
- a deployment handle with lamc-encoded bytes (`RayPipeline`, `lamc run --ray`), or with
  a plain dict of numpy arrays named as the model's inputs (`handle.remote({...})`
  answers a dict of its outputs);
- with `--http HOST:PORT` (or `serve run lamc.runtime.ray_serve:build_app out=OUT`), an
  HTTP ingress deployment speaking the KServe v2 REST protocol (`/v2/health/live`,
  `/v2/health/ready`, `/v2/models/NAME`, `/v2/models/NAME/ready`,
  `POST /v2/models/NAME/infer`), which checks `Authorization: Bearer TOKEN` when the
  pipeline was deployed with a token (`LAMC_TOKEN`).
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


def stage_resources(spec: StageSpec, threads: int | None = None) -> dict[str, Any]:
    """Ray actor options for one stage, from its device kind and the plan's prediction
    (`threads`: the session's intra-op threads, when set at deploy time)."""
    threads = threads or int(spec.session.get("threads", 0) or 0)
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
        raise TypeError(
            f"{where}: expected encoded tensors (bytes) or a dict of numpy arrays named as the "
            f"model's inputs, got {type(payload).__name__}"
        )
    request = wire.SubmitRequest()
    request.ParseFromString(payload)
    return {t.name: wire.decode(t) for t in request.tensors}


def encode_inputs(manifest: Manifest, feeds: Mapping[str, Any]) -> bytes:
    """The model's inputs, checked against the manifest, as the first stage receives them
    (each with its input edge's codec)."""
    from lamc.runtime.tensors import TensorMismatch, check_all

    unknown = sorted(set(feeds) - set(manifest.inputs))
    if unknown:
        raise TensorMismatch(
            f"input: unknown tensor(s) {', '.join(unknown)}; the model takes {', '.join(manifest.inputs)}"
        )
    checked = check_all(manifest.inputs, manifest.tensors, feeds, manifest.dims, {}, "input")
    edge = next((e for e in manifest.edges if e.source == -1), None)
    codecs = {t.name: t.codec for t in edge.tensors} if edge else {}
    return _encode({n: checked[n] for n in manifest.stages[0].receives}, codecs)


class StageDeployment:
    """The body of each stage's Serve deployment (wrapped by `serve.deployment` at deploy
    time so that importing this module never needs Ray)."""

    def __init__(
        self,
        out: str,
        index: int,
        providers: Sequence[str] | None,
        next_stage: Any = None,
        member: int = 0,
        threads: int | None = None,
    ) -> None:
        from lamc.runtime.executor import load_stage
        from lamc.runtime.tensors import check_all

        self._check_all = check_all
        self.out = Path(out)
        self.manifest = verify(self.out)
        self.spec = self.manifest.stages[index]
        self.stage = load_stage(self.out, self.spec, providers=providers, threads=threads)
        # The next stage: one handle, or a replicated stage's handles with their shares.
        self.next_stage = Members(next_stage) if isinstance(next_stage, list) else next_stage
        edge = next((e for e in self.manifest.edges if e.source == index), None)
        self.codecs = {t.name: t.codec for t in edge.tensors} if edge else {}
        self.device = self.spec.members[member].device
        self.where = f"stage {index} ({self.device}) on Ray Serve"
        self.calls = 0

    async def served(self) -> dict[str, Any]:
        """The stage, the device this replica stands for, and the requests it ran."""
        return {"stage": self.spec.index, "device": self.device, "calls": self.calls}

    async def __call__(self, payload: Any) -> Any:
        if isinstance(payload, dict):  # a plain call with the model's inputs
            return await self.call_with_arrays(payload)
        return await self.hop(payload)

    async def call_with_arrays(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The first stage called with the model's inputs as numpy arrays (by name): the
        model's outputs, decoded."""
        if self.spec.index != 0:
            raise TypeError(f"{self.where}: only the first stage takes the model's inputs")
        outputs = _decode(await self.hop(encode_inputs(self.manifest, feeds)), self.where)
        return {name: outputs[name] for name in self.manifest.outputs}

    async def hop(self, payload: bytes) -> bytes:
        """Run this stage on encoded tensors and hand its outputs on (bytes back)."""
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
        self.calls += 1
        sends = {
            name: produced[name] if name in produced else arriving[name] for name in spec.sends
        }
        encoded = _encode(sends, self.codecs)
        if self.next_stage is None:
            return encoded
        result: bytes = await self.next_stage.remote(encoded)
        return result


class Members:
    """The deployments of a replicated stage, each taking its share of the requests
    round-robin (`lamc.runtime.spread`); a caller awaits `remote(payload)` as on a handle."""

    def __init__(self, members: Sequence[Sequence[Any]]) -> None:
        from lamc.runtime.spread import Spread

        self.handles = [handle for handle, _ in members]
        self.spread = Spread([float(share) for _, share in members])

    def remote(self, payload: Any) -> Any:
        return self.handles[self.spread.pick()].remote(payload)


class Front:
    """The application's ingress when the first stage is replicated: it hands each call
    (encoded bytes or a dict of arrays) to one of the first stage's deployments."""

    def __init__(self, members: Sequence[Sequence[Any]]) -> None:
        self.members = Members(members)

    async def __call__(self, payload: Any) -> Any:
        return await self.members.remote(payload)


class HttpIngress:
    """The KServe v2 REST front door of a pipeline on Ray Serve (its HTTP proxy routes
    every path here). Handle calls (bytes or a dict of arrays) pass straight on to the
    first stage, so `RayPipeline` works the same with or without it."""

    def __init__(self, out: str, first_stage: Any, token: str | None = None) -> None:
        from lamc.runtime import kserve
        from lamc.verify import read_manifest

        self.out = Path(out)
        self.manifest = read_manifest(self.out)  # the stages verify what they load
        kserve.check_servable(self.manifest)
        self.name = kserve.model_name(self.manifest, self.out)
        self.first = first_stage
        self.token = token

    async def __call__(self, request: Any) -> Any:
        if isinstance(request, (bytes, dict)):  # a handle call (a Request is a Mapping too)
            return await self.first.remote(request)
        from starlette.responses import JSONResponse

        status, body = await self.route(
            request.method, request.url.path, request.headers.get("authorization"), request.body
        )
        return JSONResponse(body, status_code=status)

    async def route(
        self, method: str, path: str, authorization: str | None, read_body: Any
    ) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for one v2 REST request."""
        import json

        from lamc import __version__
        from lamc.runtime import kserve
        from lamc.runtime.security import token_matches

        parts = [p for p in path.split("/") if p]
        not_found = kserve.InferError("NOT_FOUND", f"no route {method} {path}")
        try:
            if parts == ["v2", "health", "live"]:
                return 200, {"live": True}
            if parts == ["v2", "health", "ready"]:
                return 200, {"ready": True}
            if not token_matches(self.token, [("authorization", authorization)]):
                raise kserve.InferError("UNAUTHENTICATED", "missing or wrong token")
            if parts == ["v2"] and method == "GET":
                return 200, {"name": "lamc", "version": __version__, "extensions": []}
            if len(parts) < 3 or parts[:2] != ["v2", "models"]:
                raise not_found
            name, rest = parts[2], parts[3:]
            version = rest[1] if rest[:1] == ["versions"] and len(rest) > 1 else ""
            if rest[:1] == ["versions"]:
                rest = rest[2:]
            kserve.check_model(self.name, name, version)
            if rest == [] and method == "GET":
                return 200, kserve.model_metadata(self.manifest, self.name)
            if rest == ["ready"] and method == "GET":
                return 200, {"name": self.name, "ready": True}
            if rest != ["infer"] or method != "POST":
                raise not_found
            try:
                body = json.loads(await read_body())
            except ValueError as exc:
                raise kserve.InferError(
                    "INVALID_ARGUMENT", f"the body is not JSON: {exc}"
                ) from None
            feeds, wanted, request_id = kserve.rest_inputs(body)
            outputs = await kserve.answer(self.manifest, feeds, wanted, self.first.remote)
            return 200, kserve.rest_outputs(self.name, request_id, outputs)
        except kserve.InferError as error:
            return error.http, {"error": str(error)}


def _bind(
    serve: Any,
    out: Path,
    manifest: Manifest,
    providers: Sequence[str] | None,
    *,
    http: bool,
    token: str | None,
    threads: int | None = None,
) -> tuple[Any, list[str]]:
    """The application: the stages chained from the last to the first, then (with `http`)
    the REST ingress in front; and the deployment names, the application's ingress first."""
    bound: Any = None
    names = []
    for spec in reversed(manifest.stages):
        # A replicated stage is one deployment per device (`stageK`, `stageK-r1`, ...), each
        # standing for one member; the stage before it spreads its requests by share.
        members = []
        for m, member in enumerate(spec.members):
            deployment_name = f"stage{spec.index}" if m == 0 else f"stage{spec.index}-r{m}"
            names.append(deployment_name)
            deployment = serve.deployment(
                name=deployment_name,
                num_replicas=1,
                ray_actor_options=stage_resources(spec, threads),
            )(StageDeployment)
            member_bound = deployment.bind(
                str(out.resolve()),
                spec.index,
                list(providers) if providers else None,
                bound,
                m,
                threads,
            )
            members.append([member_bound, member.share])
        bound = members[0][0] if len(members) == 1 else members
    if isinstance(bound, list):
        names.append("front")
        bound = serve.deployment(name="front", num_replicas=1)(Front).bind(bound)
    if http:
        names.append("http")
        ingress = serve.deployment(name="http", num_replicas=1)(HttpIngress)
        bound = ingress.bind(str(out.resolve()), bound, token)
    return bound, list(reversed(names))


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--http {text}: expected HOST:PORT")
    return host, int(port)


def deploy(
    out: Path,
    address: str,
    *,
    providers: Sequence[str] | None = None,
    name: str | None = None,
    http: str | None = None,
    token: str | None = None,
    threads: int | None = None,
) -> list[str]:
    """Deploy every stage of `out` on the Ray cluster at `address`; returns the deployment
    names, the application's ingress first. With `http` (HOST:PORT), Serve's HTTP proxy
    listens there and a KServe v2 REST ingress takes every path (`token`: the bearer token
    it asks for)."""
    ray, serve = _require_ray()

    _require_token_auth()
    listen = _host_port(http) if http is not None else None
    out = Path(out)
    manifest = verify(out)
    _require_chain(manifest)
    if listen is not None:
        from lamc.runtime.kserve import check_servable

        check_servable(manifest)
    app = name or app_name(manifest, out)
    try:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ... by version
        raise RuntimeEnvironmentError(f"cannot reach the Ray cluster at {address}: {exc}") from None
    if listen is None:
        serve.start(proxy_location="Disabled")
    else:
        serve.start(proxy_location="HeadOnly", http_options={"host": listen[0], "port": listen[1]})
    bound, names = _bind(
        serve, out, manifest, providers, http=listen is not None, token=token, threads=threads
    )
    serve.run(bound, name=app, route_prefix="/" if listen else None, blocking=False)
    return names


def _require_chain(manifest: Manifest) -> None:
    """The Serve application hands each request from stage to stage; a branch-parallel
    pipeline's join is not built for it."""
    if manifest.is_dag:
        raise UsageError(
            "this artifact's pipeline is branch-parallel; Ray Serve deploys chains of stages",
            hint="serve each stage with `lamc serve OUT --stage K --hosts hosts.yaml`, or "
            "compile with --branches off",
        )


def build_app(args: dict[str, str]) -> Any:
    """`serve run lamc.runtime.ray_serve:build_app out=OUT [providers=cpu] [token=T]`: the
    pipeline with its REST ingress, as a Serve application (the token defaults to
    $LAMC_TOKEN; none: the REST paths are open)."""
    _, serve = _require_ray()
    from lamc.runtime.executor import parse_providers

    if "out" not in args:
        raise UsageError("give out=OUT, the compiled pipeline's directory")
    out = Path(args["out"])
    manifest = verify(out)
    _require_chain(manifest)
    token = args.get("token") or os.environ.get("LAMC_TOKEN") or None
    bound, _ = _bind(
        serve, out, manifest, parse_providers(args.get("providers")), http=True, token=token
    )
    return bound


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

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        manifest = self.manifest
        response = self.handle.remote(encode_inputs(manifest, feeds))
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
