"""`--replicate` from the command line: the plan shows each replicated stage's devices and
shares, the compiled manifest records them (hash-checked like the rest), and what runs one
device a stage (gRPC stage servers, failover plans) refuses such an artifact by name, and
an edited share is caught."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.cli.helpers import lamc

TWO_BOARDS = Path(__file__).parent.parent / "data" / "two-boards-two-pcs.yaml"


def test_plan_and_compile_a_replicated_stage(tmp_path: Path) -> None:
    shown = lamc("plan", "zoo:gpt2:test", "-t", str(TWO_BOARDS), "--replicate", "--json")
    assert shown.code == 0, shown.stdout + shown.stderr
    data = json.loads(shown.stdout)
    replicated = [s for s in data["stages"] if s["replicas"]]
    assert [[r["device"] for r in s["replicas"]] for s in replicated] == [["pc-a", "pc-b"]]
    assert "pc-a|pc-b[" in data["text"]
    off = lamc("plan", "zoo:gpt2:test", "-t", str(TWO_BOARDS), "--json")
    assert off.code == 0 and not any(s["replicas"] for s in json.loads(off.stdout)["stages"])
    table = lamc("plan", "zoo:gpt2:test", "-t", str(TWO_BOARDS), "--replicate")
    assert "2 replicas" in table.stdout and "round-robin by speed" in table.stdout

    out = tmp_path / "out"
    built = lamc("compile", "zoo:gpt2:test", "-t", str(TWO_BOARDS), "--replicate", "-o", str(out))
    assert built.code == 0, built.stdout + built.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    stage = next(s for s in manifest["stages"] if s.get("replicas"))
    assert stage["device"] == stage["replicas"][0]["device"] == "pc-a"
    assert abs(sum(r["share"] for r in stage["replicas"]) - 1.0) < 1e-5
    # Its prediction is pc-a's own time for a request (what a session measures), the
    # group's period beside it.
    assert stage["predicted"]["period_ms"] < stage["predicted"]["compute_ms"]
    # In one process the replicas are one session: the answer is the pipeline's.
    ran = lamc("run", str(out), "--random", "--seed", "2", "--output", str(tmp_path / "r"))
    assert ran.code == 0, ran.stdout + ran.stderr
    assert np.isfinite(np.load(tmp_path / "r" / "logits.npy")).all()
    # Each member's bundle holds the replicated stage's files (here pc-b, not the stage's
    # own device).
    bundled = lamc("bundle", str(out), "--device", "pc-b", "-o", str(tmp_path / "pc-b"))
    assert bundled.code == 0, bundled.stdout + bundled.stderr
    for item in stage["files"]:
        assert (tmp_path / "pc-b" / item["path"]).is_file(), item["path"]
    # A gRPC stage server runs one device a stage: it says which stage and where to go.
    served = lamc("serve", str(out), "--stage", str(stage["index"]), "--listen", "127.0.0.1:45999")
    assert served.code == 2
    assert f"stage {stage['index']} is replicated over pc-a, pc-b" in served.final
    assert "--ray" in served.stdout + served.stderr
    # Failover plans are not made for it.
    refused = lamc(
        "compile", "zoo:gpt2:test", "-t", str(TWO_BOARDS), "--replicate", "--failover", "1",
        "-o", str(tmp_path / "f"),
    )  # fmt: skip
    assert refused.code == 2 and "failover plans (--failover) are not built" in refused.final
    assert not (tmp_path / "f").exists()
    # Shares edited in the manifest: every command refuses it, naming the field (exit 9).
    path = out / "manifest.json"
    manifest["stages"][stage["index"]]["replicas"][1]["share"] = 0.9
    path.write_text(json.dumps(manifest))
    edited = lamc("run", str(out), "--random")
    assert edited.code == 9, edited.stdout + edited.stderr
    assert "replicas: the shares sum to" in edited.final
