"""Input locality: the bytes a request moves over links, planned with and without knowing
where its inputs originate.

On `examples/topologies/camera-mic-edge.yaml` the camera's frames (`pixel_values`)
originate on the camera board. Without `inputs:` the plan takes every input from the
client (the edge server); the bytes it really moves are then counted with the frames
where they are. With `inputs:` the planner charges moving them, and may put the encoder
next to the camera.

    .venv/bin/python benchmarks/locality.py [--models zoo:fusion clip zoo:vit zoo:resnet]
        [--topologies T.yaml ...]

Models are planned from shapes only (no weights), CLIP from a checkpoint it writes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def clip_checkpoint(directory: Path) -> str:
    """A CLIP of ViT-B/32's image geometry (224 px, 32 px patches), narrower and shallower
    (random init): two towers, text from the client, images from the camera."""
    import torch
    import transformers

    text = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=77,
    )  # fmt: skip
    vision = transformers.CLIPVisionConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        image_size=224, patch_size=32,
    )  # fmt: skip
    config = transformers.CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=256
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).eval().save_pretrained(directory)
    return str(directory)


def main() -> None:
    from dataclasses import replace

    from lamc.compiler import analyse, plan_model
    from lamc.cost import CostModel
    from lamc.frontend import CaptureOptions
    from lamc.passes.partition.branch_plan import inputs_moved
    from lamc.topology import load_topology

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--models", nargs="+", default=["zoo:fusion", "clip", "zoo:vit", "zoo:resnet"]
    )
    parser.add_argument(
        "--topologies",
        nargs="+",
        type=Path,
        default=[
            ROOT / "examples/topologies/camera-mic-edge.yaml",
            ROOT / "examples/topologies/sensor-hub-wifi4.yaml",
        ],
    )
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lamc-locality-") as tmp:
        analysed = {
            model: analyse(
                clip_checkpoint(Path(tmp) / "clip") if model == "clip" else model,
                CaptureOptions(weights=model == "clip"),
            )
            for model in args.models
        }
        for path in args.topologies:
            sited_topology = load_topology(path)
            blind_topology = replace(sited_topology, inputs={}, _routes={})
            for model, work in analysed.items():
                blind, _ = plan_model(work, blind_topology)
                sited, _ = plan_model(work, sited_topology)
                # The blind plan where the inputs really are: the stages that take them
                # receive them from their origins.
                blind_bytes = inputs_moved(blind, work.workload, sited_topology) + sum(
                    s.transfer_bytes for s in blind.stages
                )
                blind_latency = None
                if not blind.is_dag:
                    truth = CostModel(work.workload, sited_topology)
                    first = [d.name for d in truth.devices].index(blind.stages[0].device)
                    in_ms = truth.client_ms(first, 0, inbound=True)
                    blind_latency = blind.latency_ms - blind.inbound_ms + in_ms
                rows.append((sited_topology.name, model, blind, blind_bytes, blind_latency, sited))
    print(f"{'topology':<18} {'model':<11} {'plan':<78} {'link bytes':>11} {'latency ms':>10}")
    for topology, model, blind, blind_bytes, blind_latency, sited in rows:
        latency = f"{blind_latency:.1f}" if blind_latency is not None else "-"
        print(
            f"{topology:<18} {model:<11} {'without inputs: ' + blind.text:<78} "
            f"{blind_bytes:>11,.0f} {latency:>10}"
        )
        print(
            f"{'':<18} {'':<11} {'with inputs:    ' + sited.text:<78} "
            f"{sited.link_bytes:>11,.0f} {sited.latency_ms:>10.1f}"
        )
        ratio = blind_bytes / sited.link_bytes if sited.link_bytes else float("inf")
        print(f"{'':<18} {'':<11} {'bytes moved, without / with':<78} {ratio:>10.1f}x")


if __name__ == "__main__":
    main()
