"""timm NFNet weights to nfnet_jax: as a library and as `python -m convert.from_timm`.

The conversion itself needs only numpy (and safetensors to read and write files); torch is
imported only to read `.pth` checkpoints (with `weights_only=True`), to build timm's own
freshly initialised model, or to `--verify` against timm.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

import nfnet_jax
from convert.table import flax_rule, timm_rule
from nfnet_jax.checkpoint import CheckpointError, check_shapes, param_shapes, save_checkpoint
from nfnet_jax.cli import log, run_command
from nfnet_jax.configs import model_cfgs
from nfnet_jax.factory import resolve_name
from nfnet_jax.model import NormFreeNet, abstract_model
from nfnet_jax.pretrained import PretrainedCfg

TIMM_REFERENCE_VERSION = '1.0.31'
# Where training checkpoints keep the weights, in timm's order of preference.
_WRAPPER_KEYS = ('state_dict', 'model')
_EMA_WRAPPER_KEYS = ('state_dict_ema', 'model_ema')


def to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor or array-like as numpy, bit for bit (bfloat16 through ml_dtypes)."""
    if hasattr(tensor, 'detach'):  # a torch tensor; torch itself is not imported here
        tensor = tensor.detach().cpu()
        if str(tensor.dtype) == 'torch.bfloat16':
            import ml_dtypes
            import torch

            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()
    return np.asarray(tensor)


def unwrap_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = False) -> dict[str, np.ndarray]:
    """The weights of a timm checkpoint as numpy: unwraps training checkpoints, strips `module.`."""
    wrappers = _EMA_WRAPPER_KEYS if use_ema else _WRAPPER_KEYS
    found = next((key for key in wrappers if isinstance(checkpoint.get(key), Mapping)), None)
    if found is not None:
        checkpoint = checkpoint[found]
    elif use_ema:
        raise CheckpointError(f'no EMA weights in this checkpoint (looked for {", ".join(_EMA_WRAPPER_KEYS)})')
    state_dict = {}
    for key, value in checkpoint.items():
        if not hasattr(value, 'shape'):
            raise CheckpointError(f'{key!r} holds a {type(value).__name__}, not a tensor: is this a timm state dict?')
        state_dict[key.removeprefix('module.')] = to_numpy(value)
    return state_dict


def adapt_input_conv(in_chans: int, weight: np.ndarray) -> np.ndarray:
    """timm's `adapt_input_conv` for an RGB first conv (OIHW): sum for 1 channel, tile and rescale for n."""
    if weight.shape[1] != 3:
        raise CheckpointError(f'can only adapt a 3-channel first conv to {in_chans} channels, not {weight.shape[1]}')
    work = weight.astype(np.float32)
    if in_chans == 1:
        work = work.sum(axis=1, keepdims=True)
    else:
        work = np.tile(work, (1, -(-in_chans // 3), 1, 1))[:, :in_chans] * np.float32(3 / in_chans)
    return work.astype(weight.dtype)


def expected_timm_shapes(architecture: str, **model_kwargs: Any) -> dict[str, tuple[int, ...]]:
    """The timm state dict an architecture has: key -> shape, derived through the table."""
    shapes = {}
    for path, shape in param_shapes(abstract_model(model_cfgs[architecture], **model_kwargs)).items():
        key, rule = flax_rule(path)
        shapes[key] = rule.transform.to_timm(np.broadcast_to(np.int8(0), shape)).shape
    return shapes


def convert_state_dict(state_dict: Mapping[str, Any], name: str, **model_kwargs: Any) -> dict[str, np.ndarray]:
    """A timm state dict (torch tensors or numpy arrays) to the flat Flax params of `name`.

    `model_kwargs` (num_classes, in_chans, global_pool, ...) must describe the network the
    state dict came from. Every missing, unexpected and mis-shaped key is reported in one error.
    """
    architecture, _ = resolve_name(name)
    state_dict = unwrap_state_dict(state_dict)
    got = {key: value.shape for key, value in state_dict.items()}
    expected = expected_timm_shapes(architecture, **model_kwargs)
    hint = ''
    got_fc, expected_fc = got.get('head.fc.weight'), expected.get('head.fc.weight')
    if len(expected.keys() ^ got.keys()) > len(expected) // 2:
        hint = f'most of {architecture} is missing: is this a checkpoint of another architecture?'
    elif got_fc and expected_fc and got_fc[1:] == expected_fc[1:] and got_fc[0] != expected_fc[0]:
        hint = (
            f'the checkpoint has a {got_fc[0]}-class classifier: '
            f'pass num_classes={got_fc[0]} (--num-classes on the command line)'
        )
    check_shapes(f'timm state dict for {architecture}', expected, got, hint)
    params = {}
    for key, value in state_dict.items():
        path, rule = timm_rule(key)
        params[path] = np.asarray(rule.transform.to_flax(value), order='C')
    return params


def from_timm(timm_model: Any) -> NormFreeNet:
    """A live timm NFNet as an nfnet_jax model: same architecture, head, pooling, drop rates, weights."""
    architecture = timm_model.pretrained_cfg['architecture']
    tag = timm_model.pretrained_cfg.get('tag')
    drop_paths = [m.drop_prob for m in timm_model.modules() if type(m).__name__ == 'DropPath']
    model_kwargs = dict(
        num_classes=timm_model.num_classes,
        in_chans=timm_model.in_chans,
        global_pool=timm_model.head.global_pool.pool_type,
        drop_rate=timm_model.drop_rate,
        drop_path_rate=max(drop_paths, default=0.0),
    )
    params = convert_state_dict(timm_model.state_dict(), architecture, **model_kwargs)
    name = f'{architecture}.{tag}' if tag and f'{architecture}.{tag}' in nfnet_jax.pretrained_cfgs else architecture
    return nfnet_jax.create_model(name, params=params, **model_kwargs)


def read_timm_checkpoint(path: str | Path, use_ema: bool = False) -> dict[str, np.ndarray]:
    """A timm checkpoint file as a numpy state dict: `.safetensors`, or `.pth/.pt/.bin` via torch.

    torch files are read with `weights_only=True`: a checkpoint can never run code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no checkpoint at {path}')
    if path.suffix == '.safetensors':
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return unwrap_state_dict(load_file(path), use_ema)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f'{path} is not a readable safetensors file (corrupt or truncated?): {err}') from None
    if path.suffix in ('.pth', '.pt', '.bin', '.ckpt'):
        try:
            import torch
        except ImportError:
            raise CheckpointError(
                f'reading {path.suffix} files needs torch: pip install "nfnet-jax[timm]", '
                'or convert from the .safetensors file instead'
            ) from None
        try:
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as err:  # torch raises many types for bad pickles; none is worth a traceback
            raise CheckpointError(
                f'{path} could not be read as a torch checkpoint (corrupt or truncated?): {err}'
            ) from None
        if not isinstance(checkpoint, Mapping):
            raise CheckpointError(f'{path} holds a {type(checkpoint).__name__}, not a state dict')
        return unwrap_state_dict(checkpoint, use_ema)
    raise CheckpointError(f'{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors, .pth, .pt or .bin')


def hub_checkpoint(cfg: PretrainedCfg) -> Path:
    """timm's `model.safetensors` for a tag, through huggingface_hub (its cache, its progress bar)."""
    if not cfg.has_weights:
        raise CheckpointError(
            f'timm has no pretrained weights for {cfg.name}; the tags with weights are: '
            f'{", ".join(nfnet_jax.list_models(pretrained=True))}'
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(cfg.hf_hub_id, 'model.safetensors'))
    except Exception as err:  # offline, not cached, HTTP errors: all end the same way for the user
        raise CheckpointError(
            f'could not fetch {cfg.hf_hub_id}/model.safetensors from the Hugging Face hub '
            f'({type(err).__name__}: {err}).\nDownload it where the hub can be reached and pass '
            '--checkpoint PATH, or point HF_HUB_CACHE at a cache that holds it.'
        ) from None


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
    parser.add_argument('--checkpoint', type=Path, help='a local timm checkpoint (.safetensors, .pth, .pt, .bin)')
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
    if args.output.suffix != '.safetensors':
        raise ValueError(f'{args.output}: the output must be a .safetensors file')
    if args.output.exists() and not args.force:
        raise FileExistsError(f'{args.output} already exists; pass --force to overwrite it')
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise FileNotFoundError(f'no checkpoint at {args.checkpoint}')
    if args.verify:
        from convert.verify import require_timm

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
        from convert.verify import print_report, verify_checkpoint

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
