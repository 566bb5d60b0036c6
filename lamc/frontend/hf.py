"""A Hugging Face checkpoint directory (config.json + safetensors) -> ModelSpec.

Needs the optional extra `lamc[hf]`. Pickle weights (`pytorch_model.bin`) load only with
`--trust-pickle`: unpickling runs arbitrary code from the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lamc.errors import CaptureError, missing_extra
from lamc.models.spec import Dim, ModelSpec

_PICKLE = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def spec_from_checkpoint(
    directory: Path,
    *,
    trust_pickle: bool,
    seq: int = 128,
    batch: int = 1,
    kv_cache: bool = False,
    labels: int | None = None,
    attention: str = "eager",
    weights: bool = True,
) -> ModelSpec:
    """The checkpoint as a module with example inputs and dynamic dims. It is loaded with
    the head its config names (`architectures`: a causal LM's, a sequence classifier's), or
    as a sequence classifier with `labels` classes (a new head, seeded by the caller's
    torch RNG, when the checkpoint has none). `attention`: transformers' attention
    implementation; capture uses "eager" (plain ops in the graph), training "sdpa" (whose
    boolean masks let torch.distributed.pipelining run an encoder over 3 or more stages:
    it takes every floating tensor passed between stages to need a gradient, and refuses
    one that skips a stage). `weights=False`: the architecture alone, from its config, with
    no weights read (a training stage builds it on the meta device and loads its own
    slice of the weights)."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CaptureError(f"{directory} is not a Hugging Face checkpoint: it has no config.json")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CaptureError(f"{config_path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    has_safetensors = any(directory.glob("*.safetensors"))
    pickles = [p.name for p in map(directory.joinpath, _PICKLE) if p.exists()]
    if not has_safetensors and not pickles:
        raise CaptureError(f"{directory} has no weights (model.safetensors or pytorch_model.bin)")
    if not has_safetensors and not trust_pickle:
        raise CaptureError(
            f"{directory} holds pickle weights ({', '.join(pickles)}), which can run code when loaded",
            hint="convert them to safetensors, or pass --trust-pickle if you trust this checkpoint",
        )
    try:
        import transformers
    except ImportError as exc:
        raise missing_extra("transformers", "hf") from exc

    architectures = [str(a) for a in config.get("architectures") or []]
    causal = any(a.endswith(_CAUSAL) for a in architectures)
    # An encoder-decoder with its language-model head (T5, BART, Whisper, Marian's
    # MTModel), or bare (its decoder's last hidden state out).
    seq2seq = None
    if config.get("is_encoder_decoder") and labels is None:
        seq2seq = next((a for a in architectures if a.endswith(_SEQ2SEQ_HEADS)), None)
        if seq2seq is None and not any("For" in a for a in architectures):
            seq2seq = "AutoModel"
    if kv_cache and seq2seq:
        raise CaptureError(
            f"--kv-cache for an encoder-decoder ({seq2seq}) is not built: lamc captures it "
            "as one forward (encoder inputs and decoder_input_ids in, logits out)",
            hint="compile without --kv-cache",
        )
    if kv_cache and not causal:
        raise CaptureError(
            f"--kv-cache needs a causal language model; {directory} is {', '.join(architectures) or 'not one'}"
        )
    classify = labels is not None or any(
        a.endswith("ForSequenceClassification") for a in architectures
    )
    if classify and kv_cache:
        raise CaptureError("--kv-cache needs a causal language model, not a classifier")
    auto: Any
    outputs: tuple[str, ...]
    if classify:
        auto, outputs = transformers.AutoModelForSequenceClassification, ("logits",)
    elif causal:
        auto, outputs = transformers.AutoModelForCausalLM, ("logits",)
    elif seq2seq:
        bare = seq2seq == "AutoModel"
        auto = getattr(transformers, seq2seq, None)
        outputs = ("last_hidden_state",) if bare else ("logits",)
        if auto is None:
            raise CaptureError(f"{directory}: this transformers has no class {seq2seq}")
    else:
        auto, outputs = _head_class(transformers, architectures, directory)
    extra: dict[str, Any] = {"num_labels": labels} if labels is not None else {}
    verbosity = transformers.logging.get_verbosity()
    if labels is not None:  # the new head is asked for: no report of its missing weights
        transformers.logging.set_verbosity_error()
    try:
        # An architecture without SDPA attention falls back to its eager one (the same
        # computation).
        for implementation in dict.fromkeys((attention, "eager")):
            try:
                if weights:
                    model = auto.from_pretrained(
                        str(directory),
                        local_files_only=True,
                        use_safetensors=has_safetensors,
                        attn_implementation=implementation,
                        **extra,
                    )
                else:  # the architecture alone (built where the caller says: the meta device)
                    config_object = transformers.AutoConfig.from_pretrained(
                        str(directory), local_files_only=True, **extra
                    )
                    model = auto.from_config(config_object, attn_implementation=implementation)
                break
            except ValueError as exc:
                if implementation == "eager" or "sdpa" not in str(exc).lower():
                    raise
    except Exception as exc:
        raise CaptureError(
            f"transformers could not load {directory}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        ) from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
    model.eval()
    main_input = str(getattr(model, "main_input_name", "input_ids"))
    if seq2seq:
        return _seq2seq_spec(model, directory, main_input, outputs, batch, seq)
    if _takes_text_and_image(model):
        if kv_cache:
            raise CaptureError("--kv-cache needs a causal language model, not a text-image model")
        return _text_image_spec(model, directory, batch, seq)
    if main_input == "pixel_values":
        if kv_cache:
            raise CaptureError("--kv-cache needs a causal language model, not a vision model")
        return _vision_spec(model, directory, outputs, batch)
    if main_input == "input_values":
        if kv_cache:
            raise CaptureError("--kv-cache needs a causal language model, not an audio model")
        return _audio_spec(model, directory, outputs, batch)
    if main_input != "input_ids":
        raise CaptureError(
            f"{directory} takes {main_input}: lamc captures Hugging Face models that take "
            "input_ids (text), pixel_values (vision), both (text-image) or input_values (audio) so far",
            hint="export it to ONNX yourself; its file compiles as any ONNX model",
        )
    vocab = int(getattr(model.config, "vocab_size", 30522))
    max_pos = int(getattr(model.config, "max_position_embeddings", 512) or 512)
    t = min(seq, 32, max_pos)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, t), generator=gen)
    mask = torch.ones(2, t, dtype=torch.int64)
    batch_dim, seq_dim = Dim("batch", 1, 64), Dim("seq", 1, max_pos)
    if kv_cache:
        return _decoder_spec(model, directory, vocab, max_pos, seq, batch)
    return ModelSpec(
        module=_OutputAdapter(model, outputs, causal=causal and not classify),
        example_inputs={"input_ids": ids, "attention_mask": mask},
        dynamic={
            "input_ids": {0: batch_dim, 1: seq_dim},
            "attention_mask": {0: batch_dim, 1: seq_dim},
        },
        output_names=list(outputs),
        int_ranges={"input_ids": (0, vocab), "attention_mask": (1, 2)},
        name=directory.resolve().name,
        operating_point={"batch": batch, "seq": seq},
    )


def _decoder_spec(
    model: torch.nn.Module, directory: Path, vocab: int, max_pos: int, seq: int, batch: int
) -> ModelSpec:
    """A causal LM with its KV cache as flat tensors: `past.{i}.key|value` inputs
    [batch, kv_heads, past, head_dim] and `present.{i}.key|value` outputs, dynamic past
    length, one graph for prefill and decode."""
    from lamc.models.spec import decoder_cache

    config: Any = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0))
    heads = int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 0))
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0))
    head_dim = int(getattr(text, "head_dim", None) or (hidden // heads if heads else 0))
    blocks = next(
        (
            name
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.ModuleList) and len(module) == layers
        ),
        None,
    )
    if not layers or not head_dim or blocks is None:
        raise CaptureError(
            f"{directory}: cannot tell the decoder's layers and head size from its config"
        )
    window = int(getattr(text, "sliding_window", None) or 0)
    if 2 < window < max_pos:
        # Sliding-window attention: transformers' cache drops what falls out of the window,
        # a branch on the cache's length that one graph cannot hold. torch.export proves
        # the graph for past and new tokens up to the window less 4 (its guards), so the
        # pipeline is compiled for that context; generate refuses to go past it.
        max_pos = window - 4
    gen = torch.Generator().manual_seed(0)
    batch_dim, seq_dim = Dim("batch", 1, 64), Dim("seq", 1, max_pos)
    inputs = {"input_ids": torch.randint(0, vocab, (2, min(seq, 8, max_pos)), generator=gen)}
    dynamic: dict[str, dict[int, Dim]] = {"input_ids": {0: batch_dim, 1: seq_dim}}
    kv_cache, presents = decoder_cache(
        inputs,
        dynamic,
        layers=layers,
        kv_heads=kv_heads,
        head_dim=head_dim,
        max_context=max_pos,
        layer_scope=f"model.{blocks}.{{i}}",
        batch_dim=batch_dim,
        generator=gen,
    )
    return ModelSpec(
        module=_DecoderAdapter(model, layers),
        example_inputs=inputs,
        dynamic=dynamic,
        output_names=["logits", *presents],
        int_ranges={"input_ids": (0, vocab)},
        name=directory.resolve().name,
        kv_cache=kv_cache,
        operating_point={"batch": batch, "seq": seq, "past": 0},
    )


class _DecoderAdapter(torch.nn.Module):
    """Flat past tensors in, logits and flat present tensors out: the transformers cache
    object is built and read inside, so the exported graph has plain tensors only."""

    def __init__(self, model: torch.nn.Module, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=getattr(self.model, "config", None))
        except TypeError:
            cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids, past_key_values=cache, use_cache=True, return_dict=True
        )
        presents: list[torch.Tensor] = []
        for i in range(self.layers):
            layer = out.past_key_values.layers[i]
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


_CAUSAL = ("ForCausalLM", "LMHeadModel")
_SEQ2SEQ_HEADS = ("ForConditionalGeneration", "MTModel")
# Heads over (input_ids, attention_mask) that lamc captures, by the suffix of the class
# name in `architectures`, and the outputs each returns.
_TEXT_HEADS = {
    "ForCTC": ("logits",),
    "ForAudioClassification": ("logits",),
    "ForImageClassification": ("logits",),
    "ForTokenClassification": ("logits",),
    "ForMaskedLM": ("logits",),
    "ForQuestionAnswering": ("start_logits", "end_logits"),
}


def _head_class(
    transformers: Any, architectures: list[str], directory: Path
) -> tuple[Any, tuple[str, ...]]:
    """The class to load a checkpoint that is neither a causal LM nor a sequence
    classifier with, and its outputs: the head its `architectures` names, the bare model
    where it names one (or none), and a refusal naming the head otherwise: loading such
    a checkpoint as its bare model would drop its head without a word."""
    for name in architectures:
        suffix = next((k for k in _TEXT_HEADS if name.endswith(k)), None)
        if suffix is None:
            continue
        cls = getattr(transformers, name, None)
        if cls is None:
            raise CaptureError(f"{directory}: this transformers has no class {name}")
        return cls, _TEXT_HEADS[suffix]
    heads = [a for a in architectures if "For" in a or a.endswith(_CAUSAL)]
    if heads:
        raise CaptureError(
            f"{directory} is a {', '.join(heads)}: lamc captures Hugging Face text models "
            "(input_ids and attention_mask) as bare encoders or with a causal LM, sequence "
            f"classification, {', '.join(k[3:] for k in _TEXT_HEADS)} head; not this one",
            hint="export it to ONNX yourself (its file compiles as any ONNX model), or load "
            "its bare model from a factory",
        )
    return transformers.AutoModel, ("last_hidden_state",)


def _vision_spec(
    model: torch.nn.Module, directory: Path, outputs: tuple[str, ...], batch: int
) -> ModelSpec:
    """A vision model on `pixel_values` [batch, channels, size, size], at the image size
    and channel count its config names (224 and 3 where it names none); dynamic batch."""
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, *_image_shape(model.config), generator=gen)
    if outputs == ("last_hidden_state",) and "pooler_output" in _output_keys(model, pixels):
        outputs = ("last_hidden_state", "pooler_output")
    return _one_input_spec(model, directory, outputs, "pixel_values", pixels, batch)


def _audio_spec(
    model: torch.nn.Module, directory: Path, outputs: tuple[str, ...], batch: int
) -> ModelSpec:
    """A raw-waveform audio model (Wav2Vec2, HuBERT) on `input_values` [batch, samples]:
    a window of one second at 16 kHz, rounded to a whole number of the feature encoder's
    frames, with a dynamic batch. The length is fixed: the convolutions' strides make
    every valid length a multiple of their product, which one graph over a free length
    cannot state; a caller cuts longer audio into windows, as a streaming recogniser does."""
    import math

    config: Any = model.config
    strides = [int(s) for s in getattr(config, "conv_stride", (5, 2, 2, 2, 2, 2, 2))]
    step = math.prod(strides)
    length = max(16000 // step, 4) * step
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(2, length, generator=gen)
    return _one_input_spec(model, directory, outputs, "input_values", values, batch)


def _one_input_spec(
    model: torch.nn.Module,
    directory: Path,
    outputs: tuple[str, ...],
    name: str,
    example: torch.Tensor,
    batch: int,
) -> ModelSpec:
    """A model on one tensor whose only dynamic axis is the batch (images, audio windows)."""
    return ModelSpec(
        module=_OutputAdapter(model, outputs, inputs=(name,)),
        example_inputs={name: example},
        dynamic={name: {0: Dim("batch", 1, 64)}},
        output_names=list(outputs),
        name=directory.resolve().name,
        operating_point={"batch": batch},
    )


def _seq2seq_spec(
    model: torch.nn.Module,
    directory: Path,
    main_input: str,
    outputs: tuple[str, ...],
    batch: int,
    seq: int,
) -> ModelSpec:
    """An encoder-decoder (T5, BART, Whisper) as one forward: the encoder's inputs and
    `decoder_input_ids` [batch, target] in, the decoder's `logits` out (a bare model's
    `last_hidden_state`). Text encoders take
    `input_ids` and `attention_mask` [batch, seq]; speech encoders (Whisper) take
    `input_features` [batch, mel bins, frames] at the fixed length their positions cover
    (two frames per encoder position: 3000 for 30 s)."""
    config: Any = model.config
    vocab = int(config.vocab_size)
    max_target = int(
        getattr(config, "max_target_positions", None)
        or getattr(config, "max_position_embeddings", None)
        or getattr(config, "n_positions", None)
        or 512
    )
    gen = torch.Generator().manual_seed(0)
    batch_dim, target_dim = Dim("batch", 1, 64), Dim("target", 1, max_target)
    decoder_ids = torch.randint(0, vocab, (2, min(seq, 8, max_target)), generator=gen)
    operating_point = {"batch": batch, "target": min(seq, max_target)}
    inputs: dict[str, torch.Tensor]
    dynamic: dict[str, dict[int, Dim]]
    if main_input == "input_features":
        if not hasattr(config, "num_mel_bins") or not hasattr(config, "max_source_positions"):
            raise CaptureError(
                f"{directory}: a speech encoder-decoder whose features are not laid out as "
                "Whisper's ([batch, mel bins, frames], with num_mel_bins and "
                "max_source_positions in its config); lamc captures those",
                hint="export it to ONNX yourself; its file compiles as any ONNX model",
            )
        mels = int(config.num_mel_bins)
        frames = 2 * int(config.max_source_positions)
        inputs = {
            "input_features": torch.randn(2, mels, frames, generator=gen),
            "decoder_input_ids": decoder_ids,
        }
        dynamic = {"input_features": {0: batch_dim}}
    elif main_input == "input_ids":
        max_source = int(
            getattr(config, "max_position_embeddings", None)
            or getattr(config, "n_positions", None)
            or 512
        )
        t = min(seq, 16, max_source)
        seq_dim = Dim("seq", 1, max_source)
        inputs = {
            "input_ids": torch.randint(0, vocab, (2, t), generator=gen),
            "attention_mask": torch.ones(2, t, dtype=torch.int64),
            "decoder_input_ids": decoder_ids,
        }
        dynamic = {
            "input_ids": {0: batch_dim, 1: seq_dim},
            "attention_mask": {0: batch_dim, 1: seq_dim},
        }
        operating_point["seq"] = min(seq, max_source)
    else:
        raise CaptureError(
            f"{directory}: an encoder-decoder on {main_input}; lamc captures those on "
            "input_ids (T5, BART) and input_features (Whisper)"
        )
    dynamic["decoder_input_ids"] = {0: batch_dim, 1: target_dim}
    int_ranges = {"decoder_input_ids": (0, vocab)}
    if "input_ids" in inputs:
        int_ranges.update({"input_ids": (0, vocab), "attention_mask": (1, 2)})
    return ModelSpec(
        # use_cache off: one forward, no cache objects in the graph
        module=_OutputAdapter(model, outputs, causal=True, inputs=tuple(inputs)),
        example_inputs=inputs,
        dynamic=dynamic,
        output_names=list(outputs),
        int_ranges=int_ranges,
        name=directory.resolve().name,
        operating_point=operating_point,
    )


def _takes_text_and_image(model: torch.nn.Module) -> bool:
    """A two-tower model (CLIP, SigLIP, ...): its forward takes both input_ids and
    pixel_values, and its config has a text and a vision part."""
    import inspect

    config: Any = model.config
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return (
        "input_ids" in parameters
        and "pixel_values" in parameters
        and getattr(config, "text_config", None) is not None
        and getattr(config, "vision_config", None) is not None
    )


# What a contrastive text-image model answers, where it has them.
_TEXT_IMAGE_OUTPUTS = ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds")


def _text_image_spec(model: torch.nn.Module, directory: Path, batch: int, seq: int) -> ModelSpec:
    """Texts (`input_ids`, `attention_mask` [texts, seq]) and images (`pixel_values`
    [images, channels, size, size]) in, with a batch of each: the towers' similarity
    logits and embeddings out."""
    config: Any = model.config
    text, vision = config.text_config, config.vision_config
    vocab = int(getattr(text, "vocab_size", 30522))
    max_pos = int(getattr(text, "max_position_embeddings", 77) or 77)
    gen = torch.Generator().manual_seed(0)
    t = min(seq, 16, max_pos)
    ids = torch.randint(0, vocab, (3, t), generator=gen)
    mask = torch.ones(3, t, dtype=torch.int64)
    pixels = torch.randn(2, *_image_shape(vision), generator=gen)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_dict=True)
    outputs = tuple(k for k in _TEXT_IMAGE_OUTPUTS if isinstance(out.get(k), torch.Tensor)) or (
        "logits_per_image",
    )
    texts, images = Dim("texts", 1, 64), Dim("images", 1, 64)
    seq_dim = Dim("seq", 1, max_pos)
    return ModelSpec(
        module=_OutputAdapter(
            model, outputs, inputs=("input_ids", "attention_mask", "pixel_values")
        ),
        example_inputs={"input_ids": ids, "attention_mask": mask, "pixel_values": pixels},
        dynamic={
            "input_ids": {0: texts, 1: seq_dim},
            "attention_mask": {0: texts, 1: seq_dim},
            "pixel_values": {0: images},
        },
        output_names=list(outputs),
        int_ranges={"input_ids": (0, vocab), "attention_mask": (1, 2)},
        name=directory.resolve().name,
        operating_point={"texts": batch, "images": batch, "seq": min(seq, max_pos)},
    )


def _image_shape(config: Any) -> tuple[int, int, int]:
    """(channels, height, width) a vision config names (3 and 224 where it names none)."""
    size = getattr(config, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return int(getattr(config, "num_channels", 3) or 3), height, width


def _output_keys(model: torch.nn.Module, pixels: torch.Tensor) -> list[str]:
    with torch.no_grad():
        out = model(pixel_values=pixels[:1], return_dict=True)
    return [k for k, v in out.items() if isinstance(v, torch.Tensor)]


class _OutputAdapter(torch.nn.Module):
    """Calls a transformers model and returns its named output tensor(s)."""

    def __init__(
        self,
        model: torch.nn.Module,
        outputs: tuple[str, ...],
        *,
        causal: bool = False,
        inputs: tuple[str, ...] = ("input_ids", "attention_mask"),
    ) -> None:
        super().__init__()
        self.model = model
        self.outputs = outputs
        self.causal = causal
        self.inputs = inputs

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        kwargs: dict[str, Any] = dict(zip(self.inputs, tensors))
        kwargs["return_dict"] = True
        if self.causal:
            kwargs["use_cache"] = False
        out = self.model(**kwargs)
        if len(self.outputs) == 1:
            result: torch.Tensor = out[self.outputs[0]]
            return result
        return tuple(out[name] for name in self.outputs)
