"""The normalizer-free network: stems, the pre-activation block and the model (timm's NormFreeNet).

Module and parameter paths mirror timm's state-dict keys (`stem.conv1`, `stages.2.3.conv2b`,
`attn_last.fc1`, `final_conv`, `head.fc`), so weight conversion is a table, not heuristics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nfnet_jax.models import initializers
from nfnet_jax.models.configs import NfCfg
from nfnet_jax.models.layers import (
    ATTENTION_LAYERS,
    NONLIN_GAMMA,
    Array,
    ClassifierHead,
    DownsampleAvg,
    DropPath,
    Dtype,
    GammaAct,
    Precision,
    ScaledStdConv2d,
    check_precision,
    feature_take_indices,
    make_divisible,
    max_pool_3x3_s2,
)
from nfnet_jax.models.pretrained import PretrainedCfg

STEM_TYPES = ('', 'deep', 'deep_tiered', 'deep_quad', '3x3', '7x7', 'deep_pool', '3x3_pool', '7x7_pool')


class Stem(nnx.Module):
    """timm's `create_stem`: a deep conv stack, or one 3x3 / 7x7 conv, optionally max pooled.

    Besides its output it returns the stem feature tap: for deep stems the penultimate
    conv's output before its activation, otherwise the conv's output before the pool.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stem_type: str,
        conv_layer: Callable[..., ScaledStdConv2d],
        act_layer: Callable[[], GammaAct],
        *,
        rngs: nnx.Rngs,
    ):
        if stem_type not in STEM_TYPES:
            raise ValueError(f'unknown stem_type {stem_type!r}; choose one of {STEM_TYPES}')
        self.stride = 2
        if 'deep' in stem_type:
            if 'quad' in stem_type:  # NFNet-F/L: four convs
                chs, strides = (out_chs // 8, out_chs // 4, out_chs // 2, out_chs), (2, 1, 1, 2)
                self.stride = 4
            else:
                first = 3 * out_chs // 8 if 'tiered' in stem_type else out_chs // 2
                chs, strides = (first, out_chs // 2, out_chs), (2, 1, 1)
            self.layer_names: tuple[str, ...] = ()
            for i, (c, s) in enumerate(zip(chs, strides, strict=True)):
                setattr(self, f'conv{i + 1}', conv_layer(in_chs, c, 3, stride=s, rngs=rngs))
                self.layer_names += (f'conv{i + 1}',)
                if i != len(chs) - 1:
                    setattr(self, f'act{i + 2}', act_layer())
                    self.layer_names += (f'act{i + 2}',)
                in_chs = c
            self.feature_layer = f'conv{len(chs) - 1}'
            self.feature_chs = chs[-2]
        else:
            kernel_size = 3 if '3x3' in stem_type else 7
            self.conv = conv_layer(in_chs, out_chs, kernel_size, stride=2, rngs=rngs)
            self.layer_names = ('conv',)
            self.feature_layer = 'conv'
            self.feature_chs = out_chs
        self.pool = 'pool' in stem_type
        if self.pool:
            self.stride = 4

    def prune_after_feature(self) -> None:
        """Drop the layers after the feature tap: the stem's output becomes the tap."""
        keep = self.layer_names.index(self.feature_layer) + 1
        for name in self.layer_names[keep:]:
            delattr(self, name)
        self.layer_names = self.layer_names[:keep]
        self.pool = False

    def __call__(self, x: Array) -> tuple[Array, Array]:
        feature = x
        for name in self.layer_names:
            x = getattr(self, name)(x)
            if name == self.feature_layer:
                feature = x
        if self.pool:
            x = max_pool_3x3_s2(x)
        return x, feature


class NormFreeBlock(nnx.Module):
    """Normalization-free pre-activation bottleneck block (timm's NormFreeBlock).

    `out = alpha * branch(act1(x) * beta) + shortcut`, where the shortcut of a block that
    changes shape is a downsample of `act1(x) * beta`, not of `x`.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        *,
        stride: int = 1,
        alpha: float = 1.0,
        beta: float = 1.0,
        bottle_ratio: float = 0.25,
        group_size: int | None = None,
        ch_div: int = 1,
        reg: bool = True,
        extra_conv: bool = False,
        skipinit: bool = False,
        attn_layer: Callable[..., nnx.Module] | None = None,
        attn_gain: float = 2.0,
        act_layer: Callable[[], GammaAct],
        conv_layer: Callable[..., ScaledStdConv2d],
        drop_path_rate: float = 0.0,
        rngs: nnx.Rngs,
    ):
        # RegNet blocks size the bottleneck from in_chs, ResNet-like blocks from out_chs.
        mid_chs = make_divisible((in_chs if reg else out_chs) * bottle_ratio, ch_div)
        groups = 1 if not group_size else mid_chs // group_size
        if group_size and group_size % ch_div == 0:
            mid_chs = group_size * groups
        self.alpha = alpha
        self.beta = beta
        self.attn_gain = attn_gain
        needs_downsample = in_chs != out_chs or stride != 1
        self.downsample = DownsampleAvg(in_chs, out_chs, stride, conv_layer, rngs=rngs) if needs_downsample else None
        self.act1 = act_layer()
        self.conv1 = conv_layer(in_chs, mid_chs, 1, rngs=rngs)
        self.act2 = act_layer()
        self.conv2 = conv_layer(mid_chs, mid_chs, 3, stride=stride, groups=groups, rngs=rngs)
        self.act2b = act_layer() if extra_conv else None
        self.conv2b = conv_layer(mid_chs, mid_chs, 3, groups=groups, rngs=rngs) if extra_conv else None
        self.attn = attn_layer(mid_chs, rngs=rngs) if reg and attn_layer else None
        self.act3 = act_layer()
        # conv3's gain starts at 0 unless skipinit does that job, so every branch starts silent.
        self.conv3 = conv_layer(mid_chs, out_chs, 1, gain_init=1.0 if skipinit else 0.0, rngs=rngs)
        self.attn_last = attn_layer(out_chs, rngs=rngs) if not reg and attn_layer else None
        self.drop_path = DropPath(drop_path_rate, rngs=rngs) if drop_path_rate > 0 else None
        self.skipinit_gain = nnx.Param(initializers.zeros(None, (), jnp.float32)) if skipinit else None

    def __call__(self, x: Array, rngs: nnx.Rngs | None = None) -> Array:
        out = self.act1(x) * self.beta
        shortcut = self.downsample(out) if self.downsample is not None else x
        out = self.conv1(out)
        out = self.conv2(self.act2(out))
        if self.conv2b is not None:
            out = self.conv2b(self.act2b(out))
        if self.attn is not None:
            out = self.attn_gain * self.attn(out)
        out = self.conv3(self.act3(out))
        if self.attn_last is not None:
            out = self.attn_gain * self.attn_last(out)
        if self.drop_path is not None:
            out = self.drop_path(out, rngs=rngs)
        if self.skipinit_gain is not None:
            out = out * self.skipinit_gain[...].astype(out.dtype)
        return out * self.alpha + shortcut


def as_rngs(rngs: nnx.Rngs | Array | None) -> nnx.Rngs | None:
    """A call's `rngs` as an `nnx.Rngs`: a bare key seeds its 'dropout' stream, so every layer draws a new key."""
    if rngs is None or isinstance(rngs, nnx.Rngs):
        return rngs
    return nnx.Rngs(dropout=rngs)


def drop_path_rates(drop_path_rate: float, depths: Sequence[int]) -> list[list[float]]:
    """timm's stage-wise stochastic depth: linear in block index over the whole net, in float32."""
    rates = np.linspace(0.0, drop_path_rate, sum(depths), dtype=np.float32).tolist()
    bounds = np.cumsum((0, *depths))
    return [rates[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


class NormFreeNet(nnx.Module):
    """Normalization-free network (NFNet-F/L, NF-RegNet, NF-ResNet), NHWC in, logits out.

    The public surface mirrors timm's: `forward_features` (unpooled map after the final
    activation), `forward_head(x, pre_logits=False)`, `__call__`, `forward_intermediates`,
    `reset_classifier`, `feature_info` and `set_grad_checkpointing`. A new model is in eval mode;
    `model.train()` or `nnx.view(model, deterministic=False)` enables dropout and stochastic
    depth, which draw from the model's own 'dropout' streams or from the call's `rngs`.
    `grad_checkpointing=True` rematerialises each block's activations in the backward pass
    (`nnx.remat` per block), trading compute for memory as timm's option does.
    """

    def __init__(
        self,
        cfg: NfCfg,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = 'avg',
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        precision: Precision = None,
        grad_checkpointing: bool = False,
        pretrained_cfg: PretrainedCfg | None = None,
        rngs: nnx.Rngs,
        **cfg_overrides: Any,
    ):
        cfg = replace(cfg, **cfg_overrides)
        if cfg.act_layer not in NONLIN_GAMMA:
            raise ValueError(f'no gamma constant for act_layer {cfg.act_layer!r}; known: {sorted(NONLIN_GAMMA)}')
        self.cfg = cfg
        self.pretrained_cfg = pretrained_cfg  # the tag's data settings (input size, crop, mean/std), if known
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.grad_checkpointing = grad_checkpointing
        # Every conv and matmul computes at this precision (None: JAX's default; see layers.PRECISIONS).
        self.precision = check_precision(precision)
        gamma = NONLIN_GAMMA[cfg.act_layer]
        # dm_ models scale every activation by gamma; the others fold gamma into every conv.
        conv_layer = partial(
            ScaledStdConv2d,
            same_padding=cfg.same_padding,
            eps=cfg.std_conv_eps,
            gamma=1.0 if cfg.gamma_in_act else gamma,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
        )
        act_layer = partial(GammaAct, cfg.act_layer, gamma if cfg.gamma_in_act else 1.0)
        attn_layer = None
        if cfg.attn_layer:
            attn_layer = partial(
                ATTENTION_LAYERS[cfg.attn_layer],
                **cfg.attn_kwargs,
                dtype=dtype,
                param_dtype=param_dtype,
                precision=precision,
            )

        stem_chs = make_divisible((cfg.stem_chs or cfg.channels[0]) * cfg.width_factor, cfg.ch_div)
        self.stem = Stem(in_chans, stem_chs, cfg.stem_type, conv_layer, act_layer, rngs=rngs)
        feature_info = [dict(num_chs=self.stem.feature_chs, reduction=2, module=f'stem.{self.stem.feature_layer}')]

        rates = drop_path_rates(drop_path_rate, cfg.depths)
        prev_chs = stem_chs
        net_stride = self.stem.stride
        expected_var = 1.0
        stages = []
        for stage_idx, depth in enumerate(cfg.depths):
            stride = 1 if stage_idx == 0 and self.stem.stride > 2 else 2
            net_stride *= stride
            out_chs = make_divisible(cfg.channels[stage_idx] * cfg.width_factor, cfg.ch_div)
            blocks = []
            for block_idx in range(depth):
                blocks.append(
                    NormFreeBlock(
                        prev_chs,
                        out_chs,
                        stride=stride if block_idx == 0 else 1,
                        alpha=cfg.alpha,
                        beta=1.0 / expected_var**0.5,
                        bottle_ratio=1.0 if cfg.reg and stage_idx == 0 and block_idx == 0 else cfg.bottle_ratio,
                        group_size=cfg.group_size,
                        ch_div=cfg.ch_div,
                        reg=cfg.reg,
                        extra_conv=cfg.extra_conv,
                        skipinit=cfg.skipinit,
                        attn_layer=attn_layer,
                        attn_gain=cfg.attn_gain,
                        act_layer=act_layer,
                        conv_layer=conv_layer,
                        drop_path_rate=rates[stage_idx][block_idx],
                        rngs=rngs,
                    )
                )
                # The expected variance resets after each stage's first block (its shortcut
                # is a fresh conv) and grows by alpha^2 with every residual branch.
                if block_idx == 0:
                    expected_var = 1.0
                expected_var += cfg.alpha**2
                prev_chs = out_chs
            feature_info.append(dict(num_chs=prev_chs, reduction=net_stride, module=f'stages.{stage_idx}'))
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)

        if cfg.num_features:
            self.num_features = make_divisible(cfg.width_factor * cfg.num_features, cfg.ch_div)
            self.final_conv = conv_layer(prev_chs, self.num_features, 1, rngs=rngs)
            feature_info[-1] = dict(num_chs=self.num_features, reduction=net_stride, module='final_conv')
        else:
            self.num_features = prev_chs
            self.final_conv = None
        # Kept as hashable tuples: static attributes are part of the graphdef, which jit hashes.
        self._feature_info = tuple(tuple(info.items()) for info in feature_info)
        self.final_act = act_layer()
        self.head = ClassifierHead(
            self.num_features,
            num_classes,
            global_pool,
            drop_rate,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            rngs=rngs,
        )

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm's feature_info: channels, reduction and module of each feature tap."""
        return [dict(items) for items in self._feature_info]

    @property
    def global_pool(self) -> str:
        return self.head.pool_type

    @property
    def head_hidden_size(self) -> int:
        """Width of the pooled (pre-logits) vector: the embedding size."""
        return self.head.num_features

    def check_input(self, x: Array) -> None:
        """Reject inputs that would silently compute garbage: wrong rank, layout, channels or dtype."""
        if not hasattr(x, 'shape') or not hasattr(x, 'dtype'):
            raise TypeError(
                f'expected an array (jax or numpy) of NHWC images, got a {type(x).__name__}; '
                'convert it with jnp.asarray(x, jnp.float32)'
            )
        shape = tuple(x.shape)
        if len(shape) != 4:
            raise ValueError(f'expected a 4-D NHWC image batch (N, H, W, {self.in_chans}), got shape {shape}')
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f'expected floating-point images (normalised, e.g. float32), got dtype {x.dtype}; '
                'convert with nfnet_jax.data transforms or x.astype(jnp.float32) after normalising'
            )
        if shape[-1] != self.in_chans:
            hint = ''
            if shape[1] == self.in_chans:
                hint = ' This looks like NCHW: transpose with x.transpose(0, 2, 3, 1).'
            raise ValueError(
                f'expected NHWC input with {self.in_chans} channels in the last axis, got shape {shape}.{hint}'
            )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's method: rematerialise each block in the backward pass (or stop doing so)."""
        self.grad_checkpointing = enable

    def run_stage(self, stage: Sequence[NormFreeBlock], x: Array, rngs: nnx.Rngs | None) -> Array:
        """A stage's blocks in turn, each under `nnx.remat` when grad checkpointing is on."""
        for block in stage:
            x = nnx.remat(NormFreeBlock.__call__)(block, x, rngs) if self.grad_checkpointing else block(x, rngs)
        return x

    def forward_features(self, x: Array, *, rngs: nnx.Rngs | Array | None = None) -> Array:
        """The unpooled NHWC feature map after the final conv and activation."""
        self.check_input(x)
        rngs = as_rngs(rngs)
        x, _ = self.stem(x)
        for stage in self.stages:
            x = self.run_stage(stage, x, rngs)
        if self.final_conv is not None:
            x = self.final_conv(x)
        return self.final_act(x) if self.final_act is not None else x

    def forward_head(self, x: Array, pre_logits: bool = False, *, rngs: nnx.Rngs | Array | None = None) -> Array:
        """Pool, drop out and classify a feature map; `pre_logits=True` stops before the fc."""
        return self.head(x, pre_logits=pre_logits, rngs=as_rngs(rngs))

    def __call__(self, x: Array, *, rngs: nnx.Rngs | Array | None = None) -> Array:
        """Logits; in train mode, dropout and drop path draw from `rngs` (an `nnx.Rngs` or a key) when given."""
        rngs = as_rngs(rngs)
        return self.forward_head(self.forward_features(x, rngs=rngs), rngs=rngs)

    def forward_intermediates(
        self,
        x: Array,
        indices: int | Sequence[int] | None = None,
        stop_early: bool = False,
        intermediates_only: bool = False,
        *,
        rngs: nnx.Rngs | Array | None = None,
    ) -> list[Array] | tuple[Array, list[Array]]:
        """The features at timm's taps (stem, then each stage; the last after final_conv, before final_act).

        `indices` as timm takes them: None for all five, an int n for the last n, or a
        sequence (negatives allowed). Returns `(final features, intermediates)`, or only the
        intermediates; `stop_early` skips the stages after the last tap taken.
        """
        self.check_input(x)
        rngs = as_rngs(rngs)
        take, max_index = feature_take_indices(len(self.stages) + 1, indices)
        x, stem_feature = self.stem(x)
        taps = [stem_feature]
        stages = self.stages[:max_index] if stop_early or intermediates_only else self.stages
        for stage in stages:
            x = self.run_stage(stage, x, rngs)
            taps.append(x)
        ran_all_stages = len(stages) == len(self.stages)
        if ran_all_stages and self.final_conv is not None:
            x = taps[-1] = self.final_conv(x)
        intermediates = [taps[i] for i in take]
        if intermediates_only:
            return intermediates
        return (self.final_act(x) if ran_all_stages and self.final_act is not None else x), intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_head: bool = True) -> list[int]:
        """Drop every layer that the feature taps `indices` do not need (timm's method of the same name).

        What goes: the stages after the deepest tap; final_conv and final_act unless the last
        tap is taken; the deep stem's last conv when only the stem tap is; the classifier
        (`prune_head`, or whenever the end is pruned). Returns the absolute indices taken:
        pass those, not negative ones, to `forward_intermediates` afterwards.
        """
        take, max_index = feature_take_indices(len(self.stages) + 1, indices)
        prune_end = max_index < len(self.stages)
        if prune_end:
            self.final_conv = None
            self.final_act = None
            self.num_features = self.feature_info[max_index]['num_chs']
        if max_index == 0:
            self.stem.prune_after_feature()
        self.stages = nnx.List(list(self.stages)[:max_index])
        if prune_head or prune_end:
            self.num_classes = 0
            self.head = ClassifierHead(
                self.num_features,
                0,
                '',
                self.head.drop.rate,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                precision=self.precision,
                rngs=nnx.Rngs(0),
            )
        return take

    def reset_classifier(
        self, num_classes: int, global_pool: str | None = None, *, rngs: nnx.Rngs | None = None
    ) -> None:
        """Replace the classifier with a freshly initialised one (`num_classes=0` removes it)."""
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, rngs=rngs or nnx.Rngs(0))


def abstract_model(cfg: NfCfg, **model_kwargs: Any) -> NormFreeNet:
    """The model's structure and parameter shapes, without allocating or initialising a weight."""

    def build() -> NormFreeNet:
        # A 'dropout' stream of its own, so the dropout / drop-path streams forked from it carry
        # the 'dropout' tag and `nnx.reseed(model, dropout=key)` makes them concrete afterwards.
        rngs = nnx.Rngs(0, dropout=0)
        # A traced stream counter makes flax check its sharding on every draw, which jax answers
        # by walking the whole trace: quadratic in the model's size. A numpy counter stays out of the trace.
        for stream in (rngs.default, rngs.dropout):
            stream.count.set_raw_value(np.zeros((), np.uint32))
        return NormFreeNet(cfg, rngs=rngs, **model_kwargs)

    return nnx.eval_shape(build)


def init_model(cfg: NfCfg, *, rngs: nnx.Rngs, **model_kwargs: Any) -> NormFreeNet:
    """A randomly initialised model, its weights drawn by numpy on the host and then put on the device.

    Built eagerly with jax.random, every weight shape would compile a draw; one jitted init still
    compiles an output per weight. numpy compiles nothing, and seeded from one key of `rngs`'
    'params' stream it gives the same weights on every backend and every host. The dropout and
    drop-path streams take one key from its 'dropout' stream. Inside a trace (a jitted or Linen
    init), whose keys have no value yet, jax.random draws them in the caller's program instead.
    """
    params_key, dropout_key = rngs['params'](), rngs['dropout']()
    if isinstance(params_key, jax.core.Tracer):
        return NormFreeNet(cfg, rngs=nnx.Rngs(params=params_key, dropout=dropout_key), **model_kwargs)
    with initializers.drawing_on_host(np.random.default_rng(np.asarray(jax.random.key_data(params_key)).ravel())):
        model = NormFreeNet(cfg, rngs=nnx.Rngs(params=0, dropout=dropout_key), **model_kwargs)
    nnx.update(model, jax.device_put(nnx.state(model, nnx.Param)))
    return model


def find_nfnets(module: nnx.Module) -> dict[str, NormFreeNet]:
    """Every NormFreeNet in `module` (itself included, at path ''), by dotted path: the NFNets of a user's model."""
    return {'.'.join(map(str, path)): m for path, m in nnx.iter_modules(module) if isinstance(m, NormFreeNet)}


def count_params(model: nnx.Module) -> int:
    """The number of scalar parameters, as timm's `sum(p.numel() for p in model.parameters())`."""
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
