"""Warm re-planning: a stage server dies under load and the client switches the running
pipeline to the failover plan made at compile time, reconfiguring the surviving servers
(they build their new stages from the weights they already hold) without a restart."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lamc.compiler import CompileOptions, compile_model
from lamc.passes.partition.planner import PlanRequest
from lamc.runtime.executor import Pipeline
from lamc.runtime.hosts import Endpoints
from lamc.runtime.remote import RemotePipeline
from lamc.topology import Constraints
from lamc.verify import verify
from tests.compiled import MINIPCS
from tests.conftest import analysed_model
from tests.runtime.servers import StageServers

MODEL = "zoo:gpt2:test"


@pytest.fixture(scope="module")
def three_devices(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gpt2 (test config) on three of the four mini PCs, a failover plan for each."""
    out = tmp_path_factory.mktemp("elastic") / "gpt2"
    request = PlanRequest(constraints=Constraints(stages=3, exclude=("n100-d",)))
    compile_model(
        MODEL, MINIPCS, out, CompileOptions(request=request), analysed=analysed_model(MODEL)
    )
    return out


def _feeds(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"input_ids": rng.integers(0, 500, size=(1, 10)).astype(np.int64)} for _ in range(n)]


@pytest.mark.slow
def test_a_killed_stage_under_load_switches_to_the_failover_plan(
    three_devices: Path, tmp_path: Path
) -> None:
    manifest = verify(three_devices)
    victim = 1
    lost = manifest.stages[victim].device
    failover = Pipeline.open(three_devices, without=(lost,))
    assert len(failover.manifest.stages) == 2
    feeds = _feeds(200)
    want = [Pipeline.open(three_devices).run(f)["logits"] for f in feeds[:5]]
    with StageServers(three_devices, 3, log_dir=tmp_path) as servers:
        endpoints = Endpoints(dict(enumerate(servers.addresses)))
        with RemotePipeline(
            three_devices,
            endpoints,
            timeout_s=30,
            failover=True,
            failover_grace_s=0.3,
            failback_hold_s=0.5,
        ) as client:
            for f, w in zip(feeds[:5], want, strict=True):
                np.testing.assert_array_equal(client.run(f)["logits"], w)

            def kill_when_busy() -> None:
                while client.counts["succeeded"] < 50:
                    time.sleep(0.005)
                servers.kill(victim)

            killer = threading.Thread(target=kill_when_busy)
            killer.start()
            results = client.run_many(feeds, in_flight=12)
            killer.join()
            counts = dict(client.counts)
            assert counts["accepted"] == counts["succeeded"] + counts["failed"], counts
            assert len(client.switches) == 1, client.switches
            switch = client.switches[0]
            assert switch["lost"] == (lost,) and switch["stages"] == 2
            assert switch["reused_bytes"] > 0  # the survivors built on weights they held
            # Stateless requests caught in the lost stage (or on their way to it) are sent
            # again on the new plan. Usually every one then succeeds; one sent again
            # before the switch could begin (a slow machine) may be lost twice. Whatever
            # fails was lost with the stage (and retried), within the in-flight window,
            # and nothing waits out its deadline.
            failed = [r for r in results if isinstance(r, BaseException)]
            messages = [str(f) for f in failed]
            assert len(failed) <= 12, messages
            assert all(getattr(f, "lost", False) for f in failed), messages
            assert not any("timed out" in m for m in messages), messages
            assert 0 < counts["failed"] <= counts["retried"] + len(failed), counts
            # After the switch, answers are the failover plan's, exactly.
            for f in feeds[-20:]:
                got = client.run(f)["logits"]
                np.testing.assert_array_equal(got, failover.run(f)["logits"])
            # The device comes back: healthy for the hold-down period, the pipeline moves
            # back to the primary plan.
            servers.start(victim)
            deadline = time.monotonic() + 30
            while len(client.switches) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [s["lost"] for s in client.switches] == [(lost,), ()]
            assert client.counts["failbacks"] == 1
            for f, w in zip(feeds[:5], want, strict=True):
                np.testing.assert_array_equal(client.run(f)["logits"], w)

    for k in (0, 2):
        log = (tmp_path / f"stage{k}.log").read_text()
        assert f"of the plan without {lost}" in log, log[-2000:]


@pytest.mark.slow
def test_standby_sessions_make_the_switch_a_swap(three_devices: Path, tmp_path: Path) -> None:
    """`lamc serve --standby`: once serving, each server builds the sessions of its stages
    in the failover plans; the switch then swaps sessions, and a switch back finds the
    primary's session kept."""
    manifest = verify(three_devices)
    lost = manifest.stages[1].device
    failover = Pipeline.open(three_devices, without=(lost,))
    primary = Pipeline.open(three_devices)
    feeds = _feeds(6)
    with StageServers(three_devices, 3, log_dir=tmp_path, common=["--standby"]) as servers:
        logs = [tmp_path / f"stage{k}.log" for k in range(3)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
            "standby:" in log.read_text() for log in logs
        ):
            time.sleep(0.1)
        assert all("stage(s) of other plans ready" in log.read_text() for log in logs)
        endpoints = Endpoints(dict(enumerate(servers.addresses)))
        with RemotePipeline(
            three_devices, endpoints, failover=True, failover_grace_s=0.2, failback_hold_s=0.3
        ) as client:
            client.run(feeds[0])
            servers.kill(1)
            deadline = time.monotonic() + 30
            while not client.switches and time.monotonic() < deadline:
                try:
                    client.run(feeds[0])
                except Exception:
                    continue
            for f in feeds:
                np.testing.assert_array_equal(client.run(f)["logits"], failover.run(f)["logits"])
            for k in (0, 2):
                text = logs[k].read_text()
                assert f"of the plan without {lost} in" in text, text[-2000:]
                assert "from a standby session" in text, text[-2000:]
            servers.start(1)
            deadline = time.monotonic() + 30
            while len(client.switches) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [s["lost"] for s in client.switches] == [(lost,), ()]
            for f in feeds:
                np.testing.assert_array_equal(client.run(f)["logits"], primary.run(f)["logits"])
        text = logs[0].read_text()
        assert "of the plan without nothing (the primary plan)" in text
        assert text.count("from a standby session") == 2, text[-2000:]


def test_a_reconfigure_without_the_token_is_refused(three_devices: Path) -> None:
    import grpc

    from lamc.runtime import wire

    token = "s3cret-token-for-the-test"
    with StageServers(three_devices, 3, env={"LAMC_TOKEN": token}) as servers:
        channel = grpc.insecure_channel(servers.addresses[2])
        call = channel.unary_unary(
            wire.method("Reconfigure"),
            request_serializer=wire.ReconfigureRequest.SerializeToString,
            response_deserializer=wire.ReconfigureReply.FromString,
        )
        lost = verify(three_devices).stages[1].device
        reply = call(wire.ReconfigureRequest(lost=[lost], stage=1), timeout=30)
        assert not reply.ok and reply.code == "UNAUTHENTICATED"
        wrong = call(
            wire.ReconfigureRequest(lost=[lost], stage=1),
            timeout=30,
            metadata=(("authorization", "Bearer nope"),),
        )
        assert not wrong.ok and wrong.code == "UNAUTHENTICATED"
        # With the token, a request for a stage of another device is refused with a reason.
        other = call(
            wire.ReconfigureRequest(lost=[lost], stage=0),
            timeout=30,
            metadata=(("authorization", f"Bearer {token}"),),
        )
        assert not other.ok and "runs on" in other.message
        channel.close()


@pytest.mark.slow
def test_generation_survives_a_lost_stage_with_the_same_tokens(tmp_path: Path) -> None:
    from lamc.runtime.generate import generate, tokens_of

    ref = "zoo:gpt2:test,kv=1"
    out = tmp_path / "dec"
    request = PlanRequest(constraints=Constraints(stages=3, exclude=("n100-d",)))
    compile_model(ref, MINIPCS, out, CompileOptions(request=request), analysed=analysed_model(ref))
    prompt = [[5, 17, 42, 7, 99, 3]]
    want = tokens_of(generate(Pipeline.open(out), prompt, 40))
    with StageServers(out, 3) as servers:
        endpoints = Endpoints(dict(enumerate(servers.addresses)))
        with RemotePipeline(
            out, endpoints, timeout_s=30, failover=True, failover_grace_s=0.3
        ) as client:
            got = []
            for k, token in enumerate(generate(client, prompt, 40)):
                got.append(token)
                if k == 15:
                    servers.kill(1)  # the middle stage, with its KV cache
            assert len(client.switches) == 1
    np.testing.assert_array_equal(np.stack(got, axis=1), want)
