"""timm state dicts to nfnet_jax's flat params and back, and reading timm's checkpoint files and hub weights.

The conversion needs only numpy (safetensors to read files); torch is imported only to read
`.pth`-style checkpoints, always with `weights_only=True`: a checkpoint can never run code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from nfnet_jax.models.configs import model_cfgs
from nfnet_jax.models.nfnet import abstract_model
from nfnet_jax.models.pretrained import PretrainedCfg, pretrained_cfgs, resolve_name
from nfnet_jax.weights.file import file_kind
from nfnet_jax.weights.params import CheckpointError, StateMismatchError, check_shapes, flat_params, param_shapes
from nfnet_jax.weights.table import flax_rule, timm_rule

# Where training checkpoints keep the weights, in timm's order of preference.
_WRAPPER_KEYS = ('state_dict', 'model')
_EMA_WRAPPER_KEYS = ('state_dict_ema', 'model_ema')
# The names timm's checkpoints go by; files are read by their content, not by these.
TIMM_SUFFIXES = ('.safetensors', '.pth', '.pth.tar', '.tar', '.pt', '.bin', '.ckpt')


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
    elif ema_only := [key for key in _EMA_WRAPPER_KEYS if isinstance(checkpoint.get(key), Mapping)]:
        raise CheckpointError(
            f'this training checkpoint holds only EMA weights ({", ".join(ema_only)}): '
            'pass --ema (use_ema=True) to convert them'
        )
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


def to_timm(params: Mapping[str, np.ndarray] | nnx.Module) -> dict[str, np.ndarray]:
    """Flat Flax params (or a model) as a timm state dict of numpy arrays, bit for bit: `convert_state_dict`'s inverse.

    Load it into timm with `model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})`.
    """
    if isinstance(params, nnx.Module):
        params = flat_params(params)
    state_dict, unknown = {}, []
    for path, value in params.items():
        found = flax_rule(path)
        if found is None:
            unknown.append(path)
            continue
        key, rule = found
        state_dict[key] = np.array(rule.transform.to_timm(np.asarray(value)), order='C')  # writable, for torch
    if unknown:
        raise StateMismatchError('Flax params with no timm equivalent', [], unknown, [])
    return state_dict


def training_checkpoint_globals() -> list[Any]:
    """What timm's train.py pickles beside the weights, and nothing more: the types `torch.load` may rebuild.

    `args` is an `argparse.Namespace`; metrics and arguments may be numpy scalars or arrays
    (pickled as numpy's `scalar` and `_reconstruct`, and its dtypes). numpy 1 pickles these
    under `numpy.core`, numpy 2 under `numpy._core`: both names are allowed. None of them runs code.
    """
    import argparse

    multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray
    allowed: list[Any] = [argparse.Namespace, np.ndarray, np.dtype]
    allowed += sorted({type(np.dtype(code)) for code in '?bBhHiIlLqQefdgFDGUS'}, key=str)
    for name in ('scalar', '_reconstruct'):
        function = getattr(multiarray, name)
        allowed += [(function, f'numpy.core.multiarray.{name}'), (function, f'numpy._core.multiarray.{name}')]
    return allowed


def _refused_globals(torch: Any, path: Path) -> list[str]:
    """Every global a zip checkpoint names that is not allowed (legacy pickles cannot be listed: [])."""
    allowed = set()
    for entry in training_checkpoint_globals():
        allowed |= set(entry[1:]) if isinstance(entry, tuple) else {f'{entry.__module__}.{entry.__qualname__}'}
    try:
        with open(path, 'rb') as f:
            return [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(f) if name not in allowed]
    except Exception:  # noqa: BLE001 (only the names torch met first are known then)
        return []


def _read_torch_file(path: Path) -> Any:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f'{path} is a torch checkpoint; reading it needs torch: pip install "nfnet-jax[timm]", '
            'or convert from a .safetensors file instead'
        ) from None
    try:
        # An open file, not the path: torch would pick a reader from the name's suffix, not the content.
        with open(path, 'rb') as f, torch.serialization.safe_globals(training_checkpoint_globals()):
            return torch.load(f, map_location='cpu', weights_only=True)
    except Exception as err:  # torch raises many types for bad pickles; none is worth a traceback
        text = str(err)
    # torch's own message advises weights_only=False, which would let the file run code: never repeated here.
    refused = sorted(set(re.findall(r'GLOBAL ([\w.]+)', text)))
    if refused:
        refused = _refused_globals(torch, path) or refused
        raise CheckpointError(
            f'{path} holds {", ".join(refused)}: objects other than tensors and the training metadata timm saves '
            '(epoch, args, metric, optimizer state, numpy values). They are not unpickled, since unpickling them '
            'could run code. Save the weights alone (torch.save(model.state_dict(), PATH), or safetensors) '
            'and convert that file.'
        )
    detail = text.split('WeightsUnpickler error:')[-1].strip().splitlines()[0] if text.strip() else ''
    if 'weights_only' in detail:
        detail = ''
    raise CheckpointError(
        f'{path} could not be read as a torch checkpoint (corrupt or truncated?)' + (f': {detail}' if detail else '')
    )


def read_timm_checkpoint(path: str | Path, use_ema: bool = False) -> dict[str, np.ndarray]:
    """A timm checkpoint file as a numpy state dict, read by content, whatever its name.

    Safetensors, or torch's formats (`.pth`, `.pth.tar`, `.tar`, `.pt`, `.bin`, `.ckpt`: zip or
    legacy pickle), plain state dicts or timm's training checkpoints (`state_dict`, `model`,
    their EMA twins, `module.` prefixes). torch reads with `weights_only=True`, allowing only the
    types of `training_checkpoint_globals`: a checkpoint can never run code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no checkpoint at {path}')
    kind = file_kind(path)
    if kind == 'safetensors':
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            checkpoint = load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f'{path} is not a readable safetensors file (corrupt or truncated?): {err}') from None
        return unwrap_state_dict(checkpoint, use_ema)
    if kind == 'torch':
        checkpoint = _read_torch_file(path)
        if not isinstance(checkpoint, Mapping):
            raise CheckpointError(f'{path} holds a {type(checkpoint).__name__}, not a state dict')
        return unwrap_state_dict(checkpoint, use_ema)
    raise CheckpointError(
        f'{path} is neither a torch checkpoint (zip or pickle) nor a safetensors file, whatever its name; '
        f'expected a timm checkpoint ({", ".join(TIMM_SUFFIXES)})'
    )


def hub_checkpoint(cfg: PretrainedCfg) -> Path:
    """timm's `model.safetensors` for a tag, through huggingface_hub (its cache, its progress bar)."""
    if not cfg.has_weights:
        with_weights = sorted(name for name, other in pretrained_cfgs.items() if other.has_weights)
        raise CheckpointError(
            f'timm has no pretrained weights for {cfg.name}; the tags with weights are: {", ".join(with_weights)}'
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


def pretrained_params(cfg: PretrainedCfg, **model_kwargs: Any) -> dict[str, np.ndarray]:
    """timm's hub weights for a tag as flat Flax params, for a model built with `model_kwargs`."""
    return convert_state_dict(read_timm_checkpoint(hub_checkpoint(cfg)), cfg.architecture, **model_kwargs)
