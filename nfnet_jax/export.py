"""A model as a serialized `jax.export` artifact for serving: `python -m nfnet_jax.export`.

The artifact is `nfnet_jax.inference.export_inference`: the folded inference function with the weights closed
over as constants, lowered to StableHLO for the chosen platforms. A JSON file beside it (`OUT.json`)
records what the artifact expects and returns, the data config (mean, std, crop) its images must be
prepared with, and the artifact's sha256, which the loader checks so that a damaged or altered
artifact is refused rather than run. `load_artifact(path)` does that; a process with jax alone
(neither flax nor nfnet_jax) does the same:

    data = open('model.jaxexport', 'rb').read()
    if hashlib.sha256(data).hexdigest() != json.load(open('model.jaxexport.json'))['sha256']:
        raise ValueError('model.jaxexport does not match the sha256 in model.jaxexport.json; export it again')
    exported = jax.export.deserialize(data)
    logits = exported.call(images)  # images: float32 (N, H, W, C), normalised as the model's data config says
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

import nfnet_jax
from nfnet_jax.cli import add_model_arguments, check_model_arguments, load_model, run_command
from nfnet_jax.files import atomic_write_together, check_output
from nfnet_jax.inference import OUTPUTS, export_inference
from nfnet_jax.progress import log

PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')  # jax.export's names
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
MAX_BATCH = 2**31 - 1  # XLA's dimensions are 32-bit


def parse_batch(value: str) -> int | None:
    """--batch: a positive int, or 'dynamic' (None) for any batch size."""
    if value == 'dynamic':
        return None
    try:
        batch = int(value)
    except ValueError:
        batch = 0
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"--batch must be an integer from 1 to {MAX_BATCH:,} or 'dynamic', not {value!r}")
    return batch


def parse_platforms(value: str | None) -> tuple[str, ...] | None:
    """--platforms: a comma-separated list of jax.export platforms, each once."""
    if value is None:
        return None
    platforms = tuple(p.strip() for p in value.split(','))
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or len(set(platforms)) != len(platforms):
        raise ValueError(
            f'--platforms takes a comma-separated list of {", ".join(PLATFORMS)}, each once; got {value!r}'
        )
    return platforms


def json_shape(aval: jax.core.ShapedArray) -> list[int | str]:
    """A shape for JSON: ints, and the names of symbolic dimensions."""
    return [dim if isinstance(dim, int) else str(dim) for dim in aval.shape]


def sidecar_path(output: Path) -> Path:
    """The JSON file that describes an artifact: `OUT.json`."""
    return output.with_name(output.name + '.json')


def load_artifact(path: str | os.PathLike) -> jax.export.Exported:
    """An artifact written by the command, deserialized once its bytes match the sha256 its `OUT.json` records.

    A missing sidecar or digest, or a mismatch (the artifact altered or damaged since it was written), is a
    one-line ValueError saying so: a changed artifact would otherwise run and give wrong outputs silently.
    """
    path = Path(path)
    sidecar = sidecar_path(path)
    data = path.read_bytes()
    try:
        expected = json.loads(sidecar.read_text(encoding='utf-8'))['sha256']
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f'{sidecar}: no sha256 of {path.name} to check it against ({type(err).__name__}: {err}); '
            'export the model again to write both files'
        ) from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(
            f'{path}: its sha256 does not match the one {sidecar.name} records (altered or damaged since export); '
            'export the model again'
        )
    return jax.export.deserialize(data)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python -m nfnet_jax.export',
        description='Write an NFNet as a serialized jax.export artifact (weights included) for serving.',
    )
    add_model_arguments(parser)
    parser.add_argument('-o', dest='out', required=True, type=Path, help='the artifact to write (e.g. model.jaxexport)')
    parser.add_argument('--batch', default='1', help="images per call, or 'dynamic' for any number (default 1)")
    parser.add_argument('--size', type=int, help="input height and width (default: the model's pretrained input size)")
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='float32', help='compute dtype (default float32)')
    parser.add_argument('--platforms', help=f"comma-separated, of {', '.join(PLATFORMS)} (default: this machine's)")
    parser.add_argument(
        '--output',
        choices=OUTPUTS,
        default='logits',
        help='what a call returns: logits (default), pooled '
        'pre-logits embeddings, or the list of feature maps at every tap',
    )
    parser.add_argument(
        '--precision',
        choices=('default', 'high', 'highest'),
        help="conv/matmul precision (default: JAX's); 'highest' for float32 logits as timm's on GPU and TPU",
    )
    parser.add_argument('--force', action='store_true', help='overwrite OUT (and OUT.json) if they exist')
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_run, _parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    # Everything that can be checked is checked before the model is loaded.
    batch = parse_batch(args.batch)
    platforms = parse_platforms(args.platforms)
    if args.size is not None and args.size < 1:
        raise ValueError(f'--size must be at least 1, not {args.size}')
    check_output(args.out, args.force)
    check_output(sidecar_path(args.out), args.force)
    check_model_arguments(args)

    model = load_model(args, dtype=DTYPES[args.dtype], precision=args.precision)
    exported = export_inference(model, output=args.output, batch=batch, size=args.size, platforms=platforms)
    data = exported.serialize()
    cfg = model.pretrained_cfg
    # How images are prepared for it (resized and cropped to the input shape, then normalised).
    data_config = None
    if cfg is not None:
        data_config = dict(interpolation=cfg.interpolation, crop_pct=cfg.crop_pct, mean=cfg.mean, std=cfg.std)
    description = dict(
        model=cfg.name if cfg is not None else None,
        input=dict(shape=json_shape(exported.in_avals[0]), dtype='float32', layout='NHWC'),
        output=args.output,
        outputs=[dict(shape=json_shape(a), dtype=str(a.dtype)) for a in exported.out_avals],
        compute_dtype=args.dtype,
        precision=args.precision,
        platforms=list(exported.platforms),
        data_config=data_config,
        sha256=hashlib.sha256(data).hexdigest(),
        nfnet_jax_version=nfnet_jax.__version__,
        jax_version=jax.__version__,
    )

    def write_artifact(tmp: str) -> None:
        Path(tmp).write_bytes(data)

    def write_description(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(description, indent=2) + '\n', encoding='utf-8')

    atomic_write_together({args.out: write_artifact, sidecar_path(args.out): write_description}, force=args.force)
    shapes = ' -> '.join(str(a) for a in (exported.in_avals[0], *exported.out_avals[:1]))
    log(f'wrote {args.out} ({len(data) / 2**20:.1f} MiB, {shapes}, for {", ".join(exported.platforms)})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
