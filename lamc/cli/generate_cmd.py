"""`lamc generate OUT`: prefill and decode through a compiled decoder, streaming tokens."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from lamc.cli.main import cli, lamc_command
from lamc.errors import UsageError


@cli.command("generate")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--prompt-ids", metavar="ID,ID,...", help="The prompt as token ids.")
@click.option(
    "--prompt", "prompt_text", metavar="TEXT", help="The prompt as text (needs --tokenizer)."
)
@click.option(
    "--tokenizer",
    type=click.Path(file_okay=False, path_type=Path),
    help="A Hugging Face tokenizer directory (lamc[hf]).",
)
@click.option(
    "--input",
    "inputs",
    multiple=True,
    metavar="NAME=FILE.npy",
    help="An input besides the token ids (sensor-lm's sensor), fed with the first step; "
    "without its batch axis, batch 1 is assumed.",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Tokens to generate after the prompt (fewer if an end token comes first).",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0, max=100),
    default=0.0,
    show_default=True,
    help="0: greedy; otherwise at least 1e-4 (smaller would overflow the softmax), at most 100.",
)
@click.option("--top-k", type=click.IntRange(min=0), default=0, help="Sample from the k likeliest.")
@click.option(
    "--seed",
    type=click.IntRange(min=0, max=2**128 - 1),
    default=0,
    show_default=True,
    help="Seed of the sampling (with a temperature above 0).",
)
@click.option(
    "--hosts",
    "hosts_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Generate through stage servers (`lamc serve`) listed in this file.",
)
@click.option(
    "--failover",
    is_flag=True,
    help="With --hosts: when a stage server is lost, switch to the compiled failover plan "
    "and replay the tokens so far to rebuild the KV caches there.",
)
@click.option(
    "--controller",
    metavar="HOST:PORT",
    help="With --hosts: follow the plan of a `lamc control` process (it switches the servers).",
)
@click.option("--providers", metavar="cpu|cuda,cpu|...", help="Override the execution providers.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the prompt, the token ids (and text) and the timings as JSON at the end.",
)
@lamc_command("generate")
def generate_command(
    out: Path,
    prompt_ids: str | None,
    prompt_text: str | None,
    tokenizer: Path | None,
    inputs: tuple[str, ...],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
    hosts_file: Path | None,
    failover: bool,
    controller: str | None,
    providers: str | None,
    as_json: bool,
) -> str:
    """Generate tokens one step at a time; each is printed as soon as it is known."""
    from lamc.runtime.executor import Pipeline, parse_providers
    from lamc.runtime.generate import Sampling, generate

    if temperature != temperature or 0 < temperature < 1e-4:  # NaN, or a denormal
        raise UsageError(
            f"--temperature {temperature}: use 0 (greedy) or a value from 0.0001 to 100"
        )
    decode = _tokenizer(tokenizer)
    if (prompt_ids is None) == (prompt_text is None):
        raise UsageError("give --prompt-ids 1,2,3 or --prompt TEXT --tokenizer DIR")
    if prompt_text is not None:
        if decode is None:
            raise UsageError("--prompt needs --tokenizer DIR")
        ids = list(decode.encode(prompt_text))
    else:
        try:
            ids = [int(t) for t in (prompt_ids or "").split(",") if t.strip()]
        except ValueError:
            raise UsageError(
                f"--prompt-ids {prompt_ids[:60]!r}: expected integers like 1,2,3"  # type: ignore[index]
            ) from None
        if not ids:
            raise UsageError("--prompt-ids: no token id given")
        if any(not 0 <= i < 2**63 for i in ids):
            bad = next(i for i in ids if not 0 <= i < 2**63)
            raise UsageError(f"--prompt-ids: {str(bad)[:30]} is not a token id (0 or more, int64)")
    pipeline: Any
    if (failover or controller) and hosts_file is None:
        raise UsageError("--failover and --controller are for stage servers: give --hosts")
    if failover and controller:
        raise UsageError("--controller switches the servers itself: not with --failover")
    if hosts_file is not None:
        from lamc.runtime.hosts import load_hosts
        from lamc.runtime.remote import RemotePipeline

        pipeline = RemotePipeline(
            out, load_hosts(hosts_file), failover=failover, controller=controller
        )
    else:
        pipeline = Pipeline.open(out, providers=parse_providers(providers))
    extra = _batched(pipeline.manifest, inputs)
    started = time.perf_counter()
    first = None
    produced = []
    sampling = Sampling(temperature, top_k, seed)
    try:
        for token in generate(pipeline, [ids], max_new_tokens, sampling, inputs=extra):
            first = first or time.perf_counter()
            produced.append(int(token[0]))
            if as_json:
                continue  # the JSON is all of stdout
            text = decode.decode([produced[-1]]) if decode is not None else f"{produced[-1]} "
            sys.stdout.write(text)
            sys.stdout.flush()
    finally:
        if hasattr(pipeline, "close"):
            pipeline.close()
    done = time.perf_counter()
    rate = (len(produced) - 1) / (done - first) if first and len(produced) > 1 else 0.0
    if as_json:
        import json

        summary: dict[str, Any] = {
            "prompt_ids": ids,
            "token_ids": produced,
            "first_token_ms": round(((first or done) - started) * 1000, 3),
            "tokens_per_s": round(rate, 3),
        }
        if decode is not None:
            summary["text"] = decode.decode(produced)
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        sys.stdout.write("\n")
    return (
        f"{out}: {len(produced)} token(s) after a {len(ids)}-token prompt; first in "
        f"{((first or done) - started) * 1000:.1f} ms, then {rate:.1f} tokens/s"
    )


def _batched(manifest: Any, values: tuple[str, ...]) -> dict[str, Any]:
    """`--input NAME=FILE.npy` arrays, each given a batch axis of 1 when it has one axis
    fewer than the model's input."""
    from lamc.cli.run_cmd import load_inputs

    arrays = load_inputs(values)
    for name, array in arrays.items():
        spec = manifest.tensors.get(name)
        if spec is not None and array.ndim == len(spec.shape) - 1:
            arrays[name] = array[None]
    return arrays


def _tokenizer(path: Path | None) -> Any:
    if path is None:
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UsageError("--tokenizer needs the hf extra: pip install 'lamc[hf]'") from None
    if not path.is_dir():
        raise UsageError(f"--tokenizer {path}: not a directory")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--tokenizer {path}: not a tokenizer lamc can load ({first})") from None
