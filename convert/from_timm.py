"""timm NFNet weights to nfnet_jax: the command `python -m convert.from_timm`, and the library's conversion re-exported.

The conversion itself lives in `nfnet_jax.weights` and needs only numpy (and safetensors to
read and write files); torch is imported only to read `.pth` checkpoints (with
`weights_only=True`), to build timm's own freshly initialised model, or to `--verify` against timm.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import nfnet_jax
from convert.verify import print_report, require_timm, verify_checkpoint
from nfnet_jax.cli import run_command
from nfnet_jax.factory import from_timm
from nfnet_jax.files import check_output
from nfnet_jax.models.pretrained import resolve_name
from nfnet_jax.progress import log
from nfnet_jax.weights import (
    CheckpointError,
    adapt_input_conv,
    convert_state_dict,
    expected_timm_shapes,
    hub_checkpoint,
    read_timm_checkpoint,
    save_checkpoint,
    unwrap_state_dict,
)

__all__ = [
    'adapt_input_conv',
    'convert_state_dict',
    'expected_timm_shapes',
    'from_timm',
    'hub_checkpoint',
    'main',
    'read_timm_checkpoint',
    'unwrap_state_dict',
]

TIMM_REFERENCE_VERSION = '1.0.31'


def timm_version() -> str:
    try:
        import timm
    except ImportError:
        return 'not installed'
    return timm.__version__


def fresh_timm_state_dict(architecture: str, num_classes: int) -> dict[str, np.ndarray]:
    """timm's own freshly initialised weights: works offline, needs torch and timm."""
    try:
        import timm
    except ImportError:
        raise CheckpointError(
            'converting timm\'s freshly initialised model needs timm: pip install "nfnet-jax[timm]", '
            'or pass NAME.TAG or --checkpoint'
        ) from None
    return unwrap_state_dict(timm.create_model(architecture, pretrained=False, num_classes=num_classes).state_dict())


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python -m convert.from_timm',
        description='Convert timm NFNet weights to an nfnet_jax safetensors checkpoint.',
    )
    parser.add_argument(
        'name', help="architecture (timm's fresh init) or arch.tag (hub weights), e.g. dm_nfnet_f0.dm_in1k"
    )
    parser.add_argument('-o', '--output', required=True, type=Path, help='the .safetensors file to write')
    parser.add_argument(
        '--checkpoint', type=Path, help='a timm checkpoint: safetensors or torch (.pth, .pth.tar, .bin, ...)'
    )
    parser.add_argument('--ema', action='store_true', help='take the EMA weights of a training checkpoint')
    parser.add_argument('--num-classes', type=int, help="classes of the checkpoint's classifier (default: the tag's)")
    parser.add_argument('--verify', action='store_true', help='compare with timm on a random batch before writing')
    parser.add_argument('--tolerance', type=float, default=1e-4, help='largest relative error --verify accepts')
    parser.add_argument('--force', action='store_true', help='overwrite OUTPUT if it exists')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_command(_run, _parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    # Everything that can be checked is checked before any long work starts.
    architecture, cfg = resolve_name(args.name)
    tagged = '.' in args.name
    num_classes = args.num_classes if args.num_classes is not None else cfg.num_classes
    if num_classes < 0:
        raise ValueError(f'--num-classes must be 0 or more (0: no classifier), not {num_classes}')
    check_output(args.output, args.force, suffix='.safetensors')
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise FileNotFoundError(f'no checkpoint at {args.checkpoint}')
    if args.verify:
        require_timm()

    start = time.perf_counter()
    if args.checkpoint is not None:
        log(f'reading {args.checkpoint}')
        state_dict, source = read_timm_checkpoint(args.checkpoint, use_ema=args.ema), str(args.checkpoint)
    elif tagged:
        log(f'fetching {cfg.hf_hub_id}')
        state_dict, source = read_timm_checkpoint(hub_checkpoint(cfg)), f'hf-hub:{cfg.hf_hub_id}'
    else:
        log(f"building timm's freshly initialised {architecture}")
        state_dict, source = fresh_timm_state_dict(architecture, num_classes), f'timm:{architecture} (random init)'

    log(f'converting {len(state_dict)} tensors')
    params = convert_state_dict(state_dict, architecture, num_classes=num_classes)
    check = None
    if args.verify:

        def check(tmp_path: str) -> None:
            log(f'verifying against timm on a random batch of 2 at {cfg.input_size[1]}x{cfg.input_size[2]}')
            report = verify_checkpoint(state_dict, tmp_path, architecture, num_classes, cfg.input_size[1:])
            print_report(report, args.tolerance)
            if report.worst > args.tolerance:
                raise CheckpointError(f'verification failed: relative error {report.worst:.3g} > {args.tolerance:g}')

    log(f'writing {args.output}')
    save_checkpoint(
        args.output,
        params,
        architecture=architecture,
        num_classes=num_classes,
        global_pool='avg',
        extra_metadata=dict(
            model_name=cfg.name if tagged else architecture,
            source=source,
            timm_version=timm_version(),
            timm_reference_version=TIMM_REFERENCE_VERSION,
            nfnet_jax_version=nfnet_jax.__version__,
        ),
        force=args.force,
        check=check,
    )
    n_params = sum(v.size for v in params.values())
    log(f'wrote {args.output} ({n_params:,} params) in {time.perf_counter() - start:.1f}s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
