"""`lamc run OUT`: run a compiled pipeline (all stages in this process)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from lamc.cli.main import cli, lamc_command
from lamc.cli.options import parse_mapping, parse_sizes
from lamc.cli.ui import stdout_console
from lamc.errors import AccuracyError, UsageError

# Dtypes an input tensor can have; anything else (objects, structs, strings) is refused.
_INPUT_KINDS = "biuf"


def load_inputs(values: tuple[str, ...]) -> dict[str, np.ndarray]:
    """`--input NAME=FILE.npy`, repeated, and `--input FILE.npz` (every array in it, by
    its name). Never pickled objects: each array's header is checked against its size
    before any memory is allocated for the data."""
    feeds: dict[str, np.ndarray] = {}
    archives = [v for v in values if "=" not in v and v.strip().endswith(".npz")]
    pairs = tuple(v for v in values if v not in archives)
    for path in archives:
        for name, array in _read_npz(Path(path.strip())).items():
            if name in feeds:
                raise UsageError(f"--input {path}: {name} is given twice")
            feeds[name] = array
    for name, path in parse_mapping(pairs, "--input").items():
        if name in feeds:
            raise UsageError(f"--input {name}: given twice")
        file = Path(path)
        if not file.is_file():
            raise UsageError(f"--input {name}: {path} does not exist")
        try:
            with file.open("rb") as handle:
                feeds[name] = _read_npy(handle, file.stat().st_size)
        except Exception as exc:  # numpy's header parser raises many kinds on hostile bytes
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise UsageError(f"--input {name}: {path} is not a .npy array ({reason})") from None
    return feeds


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz (a zip of .npy files), each checked like a .npy."""
    import zipfile

    if not file.is_file():
        raise UsageError(f"--input {file} does not exist")
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(file) as archive:
            for member in archive.infolist():
                name = member.filename
                if not name.endswith(".npy") or member.is_dir():
                    raise ValueError(f"{name} is not a .npy member")
                with archive.open(member) as handle:
                    arrays[name[: -len(".npy")]] = _read_npy(handle, member.file_size)
    except UsageError:
        raise
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UsageError(f"--input {file} is not an .npz of arrays ({reason})") from None
    if not arrays:
        raise UsageError(f"--input {file} holds no arrays")
    return arrays


def _read_npy(handle: Any, size: int) -> np.ndarray:
    """One .npy array from `handle` (`size` bytes in all, header included)."""
    from numpy.lib import format as npy

    version = npy.read_magic(handle)
    if version == (1, 0):
        shape, fortran, dtype = npy.read_array_header_1_0(handle, max_header_size=10_000)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = npy.read_array_header_2_0(handle, max_header_size=10_000)
    else:
        raise ValueError(f"unknown .npy format version {version}")
    if dtype.kind not in _INPUT_KINDS or dtype.fields is not None or dtype.subdtype:
        raise ValueError(f"dtype {dtype} is not a numeric tensor")
    count = 1
    for d in shape:
        count *= int(d)
    expected = count * dtype.itemsize
    available = size - handle.tell()
    if expected != available:
        raise ValueError(
            f"the header says {tuple(shape)} {dtype} ({expected} bytes), the file holds {available}"
        )
    data = np.frombuffer(handle.read(expected), dtype=dtype, count=count)
    array = data.reshape(shape, order="F" if fortran else "C")
    # Native byte order and C layout: what the engines take (and a copy we own).
    return np.array(array.astype(array.dtype.newbyteorder("="), copy=False), order="C")


def random_feeds(manifest: object, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Inputs drawn at the given dim sizes (defaults: each dim's operating size or minimum)."""
    from lamc.dims import eval_dim

    rng = np.random.default_rng(seed)
    unknown = sorted(set(sizes) - set(manifest.dims))  # type: ignore[attr-defined]
    if unknown:
        raise UsageError(
            f"--random: the pipeline has no dim {', '.join(unknown)}",
            hint=f"its dims: {', '.join(sorted(manifest.dims)) or 'none'}",  # type: ignore[attr-defined]
        )
    binding = dict(manifest.plan.get("binding", {}))  # type: ignore[attr-defined]
    binding.update(sizes)
    for name, bounds in manifest.dims.items():  # type: ignore[attr-defined]
        binding.setdefault(name, bounds.min)
    feeds = {}
    for name in manifest.inputs:  # type: ignore[attr-defined]
        spec = manifest.tensors[name]  # type: ignore[attr-defined]
        shape = tuple(eval_dim(d, binding) for d in spec.shape)
        dtype = np.dtype(spec.dtype)
        if np.issubdtype(dtype, np.integer):
            high = min(spec.range[1], 100) if spec.range is not None else 100
            feeds[name] = (
                np.ones(shape) if "mask" in name else rng.integers(0, high, size=shape)
            ).astype(dtype)
        else:
            feeds[name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def stage_server_options(fn: Any) -> Any:
    """--hosts, --endpoint and --timeout: the pipeline served by stage servers (run, bench)."""
    fn = click.option(
        "--timeout",
        "timeout_s",
        type=click.FloatRange(min=0, min_open=True),
        default=30.0,
        show_default=True,
        help="Seconds a request may take across the stage servers.",
    )(fn)
    fn = click.option(
        "--endpoint",
        "endpoints",
        multiple=True,
        metavar="STAGE=HOST:PORT",
        help="A stage server's address (repeat for each stage).",
    )(fn)
    return click.option(
        "--hosts",
        "hosts_file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Run on stage servers (`lamc serve`) listed in this file.",
    )(fn)


@cli.command("run")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--input",
    "inputs",
    multiple=True,
    metavar="NAME=FILE.npy|FILE.npz",
    help="An input tensor (repeat for each), or an .npz holding them by name.",
)
@click.option(
    "--random",
    "random_dims",
    metavar="NAME=SIZE,...",
    is_flag=False,
    flag_value="",
    default=None,
    help="Run on random inputs (optionally at these dim sizes).",
)
@click.option(
    "-o",
    "--output",
    "output_dir",
    type=click.Path(path_type=Path),
    help="Write the outputs: OUT.npz (one file), or a directory of NAME.npy.",
)
@click.option(
    "--providers",
    metavar="cpu|cuda,cpu|...",
    help="Override the manifest's execution providers (an explicit CPU fallback).",
)
@click.option("--threads", type=click.IntRange(min=0), help="Intra-op threads per stage.")
@stage_server_options
@click.option(
    "--ray",
    "ray_address",
    metavar="ADDRESS",
    help="Run on the pipeline deployed with `lamc serve OUT --ray ADDRESS`.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --random's inputs.")
@click.option(
    "--failover",
    is_flag=True,
    help="With --hosts: when a stage server is lost, switch the running servers to the "
    "failover plan compiled for losing its device (and send its requests again).",
)
@click.option(
    "--controller",
    metavar="HOST:PORT",
    help="With --hosts: follow the plan of a `lamc control` process (it switches the servers).",
)
@click.option(
    "--without",
    "without",
    metavar="DEVICE,...",
    help="Run the failover plan compiled for losing these devices (in this process).",
)
@click.option(
    "--check-finite",
    is_flag=True,
    help="Fail on a NaN or infinite value in an input (exit 2) or an output (exit 7); without it, a warning.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@lamc_command("run")
def run_command(
    out: Path,
    inputs: tuple[str, ...],
    random_dims: str | None,
    output_dir: Path | None,
    providers: str | None,
    threads: int | None,
    hosts_file: Path | None,
    endpoints: tuple[str, ...],
    timeout_s: float,
    ray_address: str | None,
    seed: int,
    failover: bool,
    controller: str | None,
    without: str | None,
    check_finite: bool,
    as_json: bool,
) -> str:
    """Verify OUT (hashes, sizes, paths), load every stage and run the pipeline."""
    from lamc.runtime.executor import Pipeline, parse_providers

    started = time.perf_counter()
    if (failover or controller) and hosts_file is None and not endpoints:
        raise UsageError("--failover and --controller are for stage servers: give --hosts")
    if failover and controller:
        raise UsageError("--controller switches the servers itself: not with --failover")
    if without is not None and (ray_address is not None or hosts_file is not None or endpoints):
        raise UsageError("--without runs in this process: not with --ray, --hosts or --endpoint")
    if ray_address is not None:
        if hosts_file is not None or endpoints:
            raise UsageError("give --ray or --hosts/--endpoint, not both")
        from lamc.runtime.ray_serve import RayPipeline

        pipeline: Any = RayPipeline(out, ray_address, timeout_s=timeout_s)
        where = f"Ray Serve at {ray_address}"
    elif hosts_file is not None or endpoints:
        pipeline = remote_pipeline(out, hosts_file, endpoints, timeout_s, failover, controller)
        where = f"stage servers {', '.join(pipeline.addresses)}"
    else:
        from lamc.runtime.loading import devices

        lost = devices(without)
        pipeline = Pipeline.open(
            out, providers=parse_providers(providers), threads=threads, without=lost
        )
        where = "this process" + (f" (failover plan without {', '.join(lost)})" if lost else "")
    loaded = time.perf_counter()
    if inputs and random_dims is not None:
        raise UsageError("give --input files or --random, not both")
    if random_dims is not None:
        feeds = random_feeds(pipeline.manifest, parse_sizes(random_dims, "--random"), seed)
    elif inputs:
        feeds = load_inputs(inputs)
    else:
        raise UsageError(
            f"no inputs: give --input NAME=FILE.npy for {', '.join(pipeline.manifest.inputs)}, or --random"
        )
    _finite(feeds, "input", check_finite)
    ran = time.perf_counter()
    try:
        outputs = pipeline.run(feeds)
    finally:
        if hasattr(pipeline, "close"):
            pipeline.close()
    done = time.perf_counter()
    _finite(outputs, "output", check_finite)
    if output_dir is not None:
        write_outputs(outputs, output_dir)
    summary = {
        "stages": len(pipeline.manifest.stages),
        "where": where,
        "load_ms": round((loaded - started) * 1000, 2),
        "run_ms": round((done - ran) * 1000, 2),
        "outputs": {
            name: {
                "dtype": str(v.dtype),
                "shape": list(v.shape),
                "mean": float(np.mean(v)) if v.size else 0.0,
            }
            for name, v in outputs.items()
        },
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        console = stdout_console()
        for name, info in summary["outputs"].items():  # type: ignore[attr-defined]
            console.print(
                f"{name}: {info['dtype']}{info['shape']} mean {info['mean']:.6g}", markup=False
            )
        console.print(
            f"ready in {summary['load_ms']} ms ({len(pipeline.manifest.stages)} stage(s) in {where}); ran in {summary['run_ms']} ms"
        )
    return f"{out}: {len(outputs)} output(s) from {len(pipeline.manifest.stages)} stage(s) in {summary['run_ms']} ms"


def write_outputs(outputs: dict[str, np.ndarray], target: Path) -> None:
    """`-o OUT.npz` (written beside, then renamed) or `-o DIR` (one NAME.npy each)."""
    if target.suffix == ".npz":
        from lamc.atomic import replace_file

        target.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            import zipfile

            from numpy.lib import format as npy

            # What np.savez writes, one NAME.npy member per output (any name, no pickle).
            with zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:
                for name, value in outputs.items():
                    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                        npy.write_array(member, np.asanyarray(value), allow_pickle=False)

        replace_file(target, write)
        return
    target.mkdir(parents=True, exist_ok=True)
    for name, value in outputs.items():
        np.save(target / f"{name.replace('/', '_')}.npy", value, allow_pickle=False)


def _finite(tensors: dict[str, np.ndarray], what: str, strict: bool) -> None:
    """NaN or infinite values: a warning, or with --check-finite a failure."""
    bad = [
        name
        for name, value in tensors.items()
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all()
    ]
    if not bad:
        return
    message = f"{what} {', '.join(bad)} hold(s) NaN or infinite values"
    if strict:
        if what == "input":
            raise UsageError(message)
        raise AccuracyError(message, hint="check the inputs, or the compression and codecs")
    click.echo(f"warning: {message} (--check-finite makes this a failure)", err=True)


def remote_pipeline(
    out: Path,
    hosts_file: Path | None,
    endpoints: tuple[str, ...],
    timeout_s: float,
    failover: bool = False,
    controller: str | None = None,
) -> Any:
    from lamc.runtime.hosts import Endpoints, load_hosts, parse_endpoints
    from lamc.runtime.remote import RemotePipeline
    from lamc.runtime.security import load_token

    config = (
        load_hosts(hosts_file) if hosts_file is not None else Endpoints({}, None, load_token(None))
    )
    config.stages.update(parse_endpoints(endpoints))
    return RemotePipeline(
        out, config, timeout_s=timeout_s, failover=failover, controller=controller
    )
