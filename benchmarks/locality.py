"""Input locality: the bytes a request moves over links, planned with and without knowing
where its inputs originate.

On `examples/topologies/camera-mic-edge.yaml` the camera's frames (`pixel_values`)
originate on the camera board. Without `inputs:` the plan takes every input from the
client (the edge server); the bytes it really moves are then counted with the frames
where they are. With `inputs:` the planner charges moving them, and may put the encoder
next to the camera.

    .venv/bin/python benchmarks/locality.py [--models zoo:vit zoo:resnet clip]
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
    from lamc.topology import load_topology

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["zoo:vit", "zoo:resnet", "clip"])
    parser.add_argument(
        "--topology", type=Path, default=ROOT / "examples/topologies/camera-mic-edge.yaml"
    )
    args = parser.parse_args()
    sited_topology = load_topology(args.topology)
    blind_topology = replace(sited_topology, inputs={}, _routes={})
    rows = []
    with tempfile.TemporaryDirectory(prefix="lamc-locality-") as tmp:
        for model in args.models:
            ref = clip_checkpoint(Path(tmp) / "clip") if model == "clip" else model
            analysed = analyse(ref)
            blind, _ = plan_model(analysed, blind_topology)
            sited, _ = plan_model(analysed, sited_topology)
            # The blind plan where the inputs really are: its first stage's device must
            # receive them from their origins.
            truth = CostModel(analysed.workload, sited_topology)
            first = [d.name for d in truth.devices].index(blind.stages[0].device)
            blind_bytes = truth.inbound_bytes(first) + sum(s.transfer_bytes for s in blind.stages)
            blind_in_ms = truth.client_ms(first, 0, inbound=True)
            rows.append(
                (
                    model,
                    blind,
                    blind_bytes,
                    blind.latency_ms - blind.inbound_ms + blind_in_ms,
                    sited,
                )
            )
    print(f"{'model':<12} {'plan':<48} {'link bytes':>12} {'latency ms':>11}")
    for model, blind, blind_bytes, blind_latency, sited in rows:
        print(
            f"{model:<12} {'without inputs: ' + blind.text:<48} {blind_bytes:>12,.0f} {blind_latency:>11.1f}"
        )
        print(
            f"{'':<12} {'with inputs:    ' + sited.text:<48} {sited.link_bytes:>12,.0f} {sited.latency_ms:>11.1f}"
        )
        ratio = blind_bytes / sited.link_bytes if sited.link_bytes else float("inf")
        print(f"{'':<12} {'bytes moved, without / with':<48} {ratio:>11.1f}x")


if __name__ == "__main__":
    main()
