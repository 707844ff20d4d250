"""timm's Mixup and CutMix with label smoothing, on device: a pure, jittable function of (key, images, labels).

As in timm, every image is mixed with its mirror in the batch (image i with image B - 1 - i), with
one lambda for the whole batch ('batch'), one per mirrored pair ('pair') or one per image ('elem');
CutMix pastes a box of the mirror image and, with `correct_lam`, sets lambda to the kept area after
the box is clipped at the borders. The targets are label-smoothed one-hots mixed with the same
lambdas, for `soft_target_cross_entropy`. `sample` makes the random draws and `apply` the
deterministic rest, so a draw can be replayed through timm's own code.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

MODES = ('batch', 'pair', 'elem')
Draws = dict[str, jax.Array]


@dataclass(frozen=True)
class Mixup:
    """timm's `Mixup` (its arguments and defaults); `mixup(key, images, labels) -> (images, soft targets)`.

    Images are NHWC, labels int class indices (or with `multi_label`, dense (B, num_classes) 0/1
    targets, smoothed towards 0.5), the batch size even. A `cutmix_minmax` (min, max)
    draws the CutMix box's sides as those fractions of the image instead of from lambda, and turns
    CutMix on (alpha 1), as in timm.
    """

    mixup_alpha: float = 1.0
    cutmix_alpha: float = 0.0
    cutmix_minmax: tuple[float, float] | None = None
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = 'batch'
    correct_lam: bool = True
    label_smoothing: float = 0.1
    num_classes: int = 1000
    multi_label: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f'unknown mode {self.mode!r}; choose one of {", ".join(MODES)}')
        if self.cutmix_minmax is not None:
            if len(self.cutmix_minmax) != 2:
                raise ValueError(f'cutmix_minmax takes (min, max), got {self.cutmix_minmax}')
            object.__setattr__(self, 'cutmix_alpha', 1.0)
        if not (self.mixup_alpha > 0 or self.cutmix_alpha > 0):
            raise ValueError('one of mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax must be set')

    def num_draws(self, batch_size: int) -> int:
        """How many lambdas a batch gets: 1 per batch, per mirrored pair or per image."""
        if batch_size % 2:
            raise ValueError(f'Mixup mixes image i with image B - 1 - i: the batch size must be even, got {batch_size}')
        return {'batch': 1, 'pair': batch_size // 2, 'elem': batch_size}[self.mode]

    def sample(self, key: jax.Array, batch_size: int, height: int, width: int) -> Draws:
        """The raw draws, one row per lambda: timm's np.random draws (uniforms, Betas, box integers)."""
        n = self.num_draws(batch_size)
        keys = jax.random.split(key, 5)
        # Both Betas are drawn (one call: one sampler to compile), as in timm's per-image mode;
        # a disabled one (alpha 0) is drawn at alpha 1 and never used.
        alphas = jnp.array([[self.cutmix_alpha or 1.0], [self.mixup_alpha or 1.0]])
        lam_cutmix, lam_mixup = jax.random.beta(keys[2], alphas, alphas, (2, n))
        draws = dict(
            u_prob=jax.random.uniform(keys[0], (n,)),  # mix at all when < prob
            u_switch=jax.random.uniform(keys[1], (n,)),  # CutMix rather than Mixup when < switch_prob
            lam_cutmix=lam_cutmix,
            lam_mixup=lam_mixup,
        )
        if self.cutmix_minmax is None:  # the box center, its size follows from lambda
            k_y, k_x = jax.random.split(keys[3])
            draws['cy'] = jax.random.randint(k_y, (n,), 0, height)
            draws['cx'] = jax.random.randint(k_x, (n,), 0, width)
        else:  # the box sides, then its top-left corner where it fits
            low, high = self.cutmix_minmax
            k_h, k_w, k_y, k_x = jax.random.split(keys[3], 4)
            draws['cut_h'] = jax.random.randint(k_h, (n,), int(height * low), int(height * high))
            draws['cut_w'] = jax.random.randint(k_w, (n,), int(width * low), int(width * high))
            draws['yl'] = jax.random.randint(k_y, (n,), 0, height - draws['cut_h'] + 1)
            draws['xl'] = jax.random.randint(k_x, (n,), 0, width - draws['cut_w'] + 1)
        return draws

    def use_cutmix(self, draws: Draws) -> jax.Array:
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            return draws['u_switch'] < self.switch_prob
        return jnp.full(draws['u_switch'].shape, self.cutmix_alpha > 0)

    def box(self, draws: Draws, lam: jax.Array, height: int, width: int) -> tuple[jax.Array, ...]:
        """timm's rand_bbox (a box of area ~ (1 - lam), clipped at the borders) or rand_bbox_minmax."""
        if self.cutmix_minmax is not None:
            return draws['yl'], draws['yl'] + draws['cut_h'], draws['xl'], draws['xl'] + draws['cut_w']
        ratio = jnp.sqrt(1 - lam)
        cut_h, cut_w = (height * ratio).astype(jnp.int32), (width * ratio).astype(jnp.int32)
        cy, cx = draws['cy'], draws['cx']
        return (
            jnp.clip(cy - cut_h // 2, 0, height),
            jnp.clip(cy + (cut_h + 1) // 2, 0, height),
            jnp.clip(cx - cut_w // 2, 0, width),
            jnp.clip(cx + (cut_w + 1) // 2, 0, width),
        )

    def apply(self, draws: Draws, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Mix the batch with its mirror as the draws say; returns the images and the float32 soft targets."""
        batch_size, height, width = images.shape[:3]
        use_cutmix = self.use_cutmix(draws)
        lam = jnp.where(
            draws['u_prob'] < self.prob, jnp.where(use_cutmix, draws['lam_cutmix'], draws['lam_mixup']), 1.0
        )
        mixed = lam != 1.0
        yl, yh, xl, xh = self.box(draws, lam, height, width)
        if self.correct_lam or self.cutmix_minmax is not None:
            area = ((yh - yl) * (xh - xl)).astype(jnp.float32)
            lam = jnp.where(use_cutmix & mixed, 1.0 - area / float(height * width), lam)
        values = (lam, mixed, use_cutmix, yl, yh, xl, xh)
        lam, mixed, use_cutmix, yl, yh, xl, xh = (self.per_image(v, batch_size) for v in values)
        mirror = images[::-1]
        rows, cols = jnp.arange(height)[None, :, None], jnp.arange(width)[None, None, :]
        inside = (rows >= yl[:, None, None]) & (rows < yh[:, None, None])
        inside &= (cols >= xl[:, None, None]) & (cols < xh[:, None, None])
        paste = ((mixed & use_cutmix)[:, None, None] & inside)[..., None]
        blend = (mixed & ~use_cutmix)[:, None, None, None]
        lam_images = lam.astype(images.dtype)[:, None, None, None]
        images = jnp.where(paste, mirror, jnp.where(blend, images * lam_images + mirror * (1 - lam_images), images))
        return images, mixup_target(labels, self.num_classes, lam, self.label_smoothing, self.multi_label)

    def per_image(self, values: jax.Array, batch_size: int) -> jax.Array:
        """One row per image from one per lambda: the batch's for all, or pair i's also for image B - 1 - i."""
        if self.mode == 'batch':
            return jnp.broadcast_to(values, (batch_size,))
        if self.mode == 'pair':
            return jnp.concatenate([values, values[::-1]])
        return values

    def __call__(self, key: jax.Array, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.apply(self.sample(key, *images.shape[:3]), images, labels)


def mixup_target(
    labels: jax.Array, num_classes: int, lam: jax.Array, smoothing: float = 0.0, multi_label: bool = False
) -> jax.Array:
    """timm's mixup_target: smoothed one-hots (or dense multi-labels) mixed with the batch's mirror, `lam` per image."""
    if multi_label:
        if labels.shape[1:] != (num_classes,):
            raise ValueError(f'multi-label targets must be (batch, {num_classes}), got {labels.shape}')
        y1 = labels.astype(jnp.float32) * (1.0 - smoothing) + 0.5 * smoothing
    else:
        off_value = smoothing / num_classes
        on_value = 1.0 - smoothing + off_value
        y1 = jnp.where(jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_), on_value, off_value).astype(jnp.float32)
    lam = jnp.asarray(lam, jnp.float32).reshape(-1, 1)
    return y1 * lam + y1[::-1] * (1.0 - lam)


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """timm's SoftTargetCrossEntropy: mean over the batch of -sum(targets * log_softmax(logits)), in float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(-targets * log_probs, axis=-1))
