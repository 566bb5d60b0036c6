"""Autoregressive generation through a compiled decoder (captured with its KV cache).

An encoder-decoder captured as one forward (T5, BART, Whisper; no caches) generates by
running its encoder inputs and the decoder's tokens so far at every step.

One graph serves prefill and decode: the first step feeds the prompt with empty caches
(past length 0), each later step feeds the last token. A model that takes more than
token ids (sensor-lm's `sensor`) gets those inputs whole with the first step; later steps
feed them with their growing axis (a dim that may be 0, such as `frames`) empty, since
their positions are in the caches already. Each step is one call of the
pipeline (in process, or across stage servers) carrying the sequence's id and position:
every stage keeps its own layers' caches (`lamc.runtime.kvcache`), and only hidden states
travel between stages. Where a pipeline cannot keep caches in its stages (a stage reads
another stage's cache values), `generate` says so; `local=False` makes the caches travel
with every step instead.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lamc.errors import RuntimeEnvironmentError, UsageError
from lamc.manifest import Manifest
from lamc.runtime.kvcache import Step, zeros


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: the whole vocabulary
    seed: int = 0


def cache_names(manifest: Manifest) -> list[tuple[str, str]]:
    """(past input, present output) pairs of every layer, from the stages' KV ownership."""
    pairs: list[tuple[str, str]] = []
    for stage in manifest.stages:
        kv = stage.kv_cache
        if kv is None:
            continue
        if len(kv.past_inputs) != len(kv.present_outputs):
            raise UsageError(
                f"stage {stage.index}: its KV cache lists {len(kv.past_inputs)} past and "
                f"{len(kv.present_outputs)} present tensors"
            )
        pairs.extend(zip(kv.past_inputs, kv.present_outputs, strict=True))
    if not pairs:
        raise UsageError(
            "this pipeline has no KV cache: compile a decoder captured with it (for the zoo: kv=1)"
        )
    return pairs


def empty_caches(manifest: Manifest, batch: int) -> dict[str, np.ndarray]:
    """Zero-length caches (past = 0) in the manifest's shapes and dtypes."""
    pairs = cache_names(manifest)
    past_dim = next(s.kv_cache.past_dim for s in manifest.stages if s.kv_cache is not None)
    return {past: zeros(manifest, past, {"batch": batch}, past_dim, 0) for past, _ in pairs}


def first_step_inputs(
    manifest: Manifest, inputs: Mapping[str, np.ndarray] | None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """(the inputs besides token ids for the first step, the same for every later step,
    the positions they add): each checked to be one the model takes, none missing."""
    past = {n for s in manifest.stages if s.kv_cache for n in s.kv_cache.past_inputs}
    wanted = [n for n in manifest.inputs if n != "input_ids" and n not in past]
    missing = [n for n in wanted if n not in (inputs or {})]
    given = _checked_inputs(
        inputs, wanted, "input_ids", f"the model also takes {', '.join(missing)}"
    )
    later: dict[str, np.ndarray] = {}
    added = 0
    for name, value in given.items():
        shape = manifest.tensors[name].shape
        axes = [
            k
            for k, dim in enumerate(shape)
            if isinstance(dim, str) and dim in manifest.dims and manifest.dims[dim].min == 0
        ]
        if not axes or value.ndim != len(shape):
            raise UsageError(
                f"input {name}: generation feeds it with the first step only, and the model "
                f"has no axis of it that may be empty for the later steps (shape {list(shape)})"
            )
        later[name] = np.take(value, np.arange(0), axis=axes[0])
        added += value.shape[axes[0]]
    return given, later, added


def _checked_inputs(
    inputs: Mapping[str, np.ndarray] | None, wanted: list[str], besides: str, missing_says: str
) -> dict[str, np.ndarray]:
    """`inputs`, refused when one is not among `wanted` or one of `wanted` is absent
    (`missing_says` leads the message, which names the --input to give)."""
    given = dict(inputs or {})
    unknown = sorted(set(given) - set(wanted))
    if unknown:
        raise UsageError(
            f"input {', '.join(unknown)}: the model takes "
            f"{', '.join(wanted) or 'token ids only'} besides {besides}"
        )
    missing = [n for n in wanted if n not in given]
    if missing:
        raise UsageError(
            f"{missing_says}: give --input " + " --input ".join(f"{n}=FILE.npy" for n in missing)
        )
    return given


def _pick(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """Next token per sequence from the last position's logits [batch, vocab]."""
    if sampling.temperature <= 0:
        return np.argmax(logits, axis=-1)
    scaled = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k > 0:
        kth = np.sort(scaled, axis=-1)[:, -min(sampling.top_k, scaled.shape[-1])][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    scaled -= scaled.max(axis=-1, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])


def generate(
    pipeline: Any,
    prompt: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling | None = None,
    *,
    logits_name: str = "logits",
    local: bool = True,
    inputs: Mapping[str, np.ndarray] | None = None,
) -> Iterator[np.ndarray]:
    """Yield the next token of every sequence ([batch] int64), step by step.

    `pipeline` is anything with `manifest` and `run(feeds, sequence=...)`: the in-process
    Pipeline or a RemotePipeline over stage servers. Prompts must have equal lengths.
    `local`: caches stay in their stages (else they travel with each step). `inputs`: the
    model's inputs besides token ids (fed whole with the first step)."""
    sampling = sampling or Sampling()
    manifest: Manifest = pipeline.manifest
    lengths = {len(p) for p in prompt}
    if len(lengths) != 1 or 0 in lengths:
        raise UsageError("prompts must be non-empty and of equal length")
    if DECODER_IDS in manifest.inputs and not any(s.kv_cache for s in manifest.stages):
        yield from _encoder_decoder_steps(
            pipeline, np.asarray(prompt, dtype=np.int64), max_new_tokens, sampling,
            logits_name, inputs,
        )  # fmt: skip
        return
    pairs = cache_names(manifest)
    limit = min(
        (s.kv_cache.max_context for s in manifest.stages if s.kv_cache is not None),
        default=0,
    )
    first, later, added = first_step_inputs(manifest, inputs)
    total = added + lengths.pop() + max_new_tokens
    if limit and total > limit:
        raise UsageError(
            f"{f'{added} input positions + ' if added else ''}prompt + {max_new_tokens} new "
            f"tokens = {total} positions, over the context the pipeline was compiled for "
            f"({limit}); compile with a larger --context"
        )
    rng = np.random.default_rng(sampling.seed)
    ids = np.asarray(prompt, dtype=np.int64)
    if local:
        yield from _local_steps(
            pipeline, ids, max_new_tokens, sampling, rng, logits_name, (first, later, added)
        )
        return
    caches = empty_caches(manifest, ids.shape[0])
    extra = first
    for _ in range(max_new_tokens):
        outputs = pipeline.run({"input_ids": ids, **extra, **caches})
        token = _pick(outputs[logits_name][:, -1, :], sampling, rng).astype(np.int64)
        yield token
        caches = {past: outputs[present] for past, present in pairs}
        ids = token[:, None]
        extra = later


DECODER_IDS = "decoder_input_ids"


def _encoder_decoder_steps(
    pipeline: Any,
    ids: np.ndarray,
    max_new_tokens: int,
    sampling: Sampling,
    logits_name: str,
    inputs: Mapping[str, np.ndarray] | None,
) -> Iterator[np.ndarray]:
    """An encoder-decoder captured as one forward (no caches): each step runs the encoder
    inputs and every decoder token so far, and takes the last position's logits. The
    prompt is the decoder's (its start token first)."""
    manifest: Manifest = pipeline.manifest
    wanted = [n for n in manifest.inputs if n != DECODER_IDS]
    given = _checked_inputs(inputs, wanted, DECODER_IDS, "the encoder's inputs are missing")
    shape = manifest.tensors[DECODER_IDS].shape
    target = shape[1] if len(shape) > 1 else None
    limit = 0
    if isinstance(target, str) and target in manifest.dims:
        limit = manifest.dims[target].max
    total = ids.shape[1] + max_new_tokens
    if limit and total > limit:
        raise UsageError(
            f"decoder prompt + {max_new_tokens} new tokens = {total}, over the "
            f"{limit} decoder positions the pipeline takes"
        )
    rng = np.random.default_rng(sampling.seed)
    for _ in range(max_new_tokens):
        outputs = pipeline.run({**given, DECODER_IDS: ids})
        token = _pick(outputs[logits_name][:, -1, :], sampling, rng).astype(np.int64)
        yield token
        ids = np.concatenate([ids, token[:, None]], axis=1)


def _local_steps(
    pipeline: Any,
    ids: np.ndarray,
    max_new_tokens: int,
    sampling: Sampling,
    rng: np.random.Generator,
    logits_name: str,
    extra: tuple[dict[str, np.ndarray], dict[str, np.ndarray], int] = ({}, {}, 0),
) -> Iterator[np.ndarray]:
    sequence = uuid.uuid4().hex
    position = 0
    ended = False
    history = ids  # every token so far: what a replay feeds a new plan's stages
    first, later, added = extra  # added: the positions `first` adds to the sequence
    try:
        for k in range(max_new_tokens):
            ended = k == max_new_tokens - 1
            epoch = len(getattr(pipeline, "switches", ()))
            feeds = {"input_ids": ids, **(first if position == 0 else later)}
            try:
                outputs = pipeline.run(feeds, sequence=Step(sequence, position, ended))
                position += ids.shape[1] + (added if position == 0 else 0)
            except RuntimeEnvironmentError:
                # A stage was lost with this sequence's KV cache: once the pipeline is on
                # its failover plan, rebuild the caches there by replaying every input.
                recover = getattr(pipeline, "recover", None)
                if recover is None or not recover(epoch):
                    raise
                sequence = uuid.uuid4().hex
                replay = {"input_ids": history, **first}
                outputs = pipeline.run(replay, sequence=Step(sequence, 0, ended))
                position = history.shape[1] + added
            token = _pick(outputs[logits_name][:, -1, :], sampling, rng).astype(np.int64)
            ids = token[:, None]
            history = np.concatenate([history, ids], axis=1)
            yield token
    finally:
        release = getattr(pipeline, "release", None)
        if not ended and release is not None:
            release(sequence)  # stopped early: free the stages' caches now


def reference_greedy(
    reference: Any,
    manifest: Manifest,
    prompt: Sequence[Sequence[int]],
    max_new_tokens: int,
    inputs: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Greedy tokens from the source model run on the whole sequence at every step (no
    cache reuse; `inputs` besides token ids fed whole every time): the check for
    `generate`."""
    ids = np.asarray(prompt, dtype=np.int64)
    caches = empty_caches(manifest, ids.shape[0])
    new = []
    for _ in range(max_new_tokens):
        logits = reference({"input_ids": ids, **(inputs or {}), **caches})["logits"]
        token = np.argmax(logits[:, -1, :], axis=-1).astype(np.int64)
        new.append(token)
        ids = np.concatenate([ids, token[:, None]], axis=1)
    return np.stack(new, axis=1)


def tokens_of(steps: Iterator[np.ndarray]) -> np.ndarray:
    """[batch, new tokens] from `generate`'s steps."""
    return np.stack(list(steps), axis=1)
