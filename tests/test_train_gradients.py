"""Gradients against timm's torch autograd, and AGC against timm's own adaptive_clip_grad.

Every timm tensor is randomised (conftest.randomize_), drop rates are 0, the loss is the
label-smoothed cross entropy (0.1) of a batch of 2 at 64x64. Metric, per parameter tensor:
max|ours - timm| / max|timm| in timm's layout; the test takes the worst tensor of the model.
"""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import nnx
from helpers import cpu_backend, nchw, randomize_, relative_error
from timm.models import model_parameters
from timm.utils.agc import adaptive_clip_grad as timm_adaptive_clip_grad

from nfnet_jax.cpu import onednn
from nfnet_jax.factory import from_timm
from nfnet_jax.train import adaptive_clip_grad, cross_entropy_loss
from nfnet_jax.weights import convert_state_dict, dotted_path, to_timm

GRAD_RTOL = 1e-4
AGC_RTOL = 1e-6
ARCHITECTURES = ['dm_nfnet_f0', 'nfnet_l0', 'eca_nfnet_l0', 'nf_regnet_b0', 'nf_resnet26']
OP_BY_OP = {'nf_regnet_b0'}  # gradients computed without jit (see `grads`)
ONEDNN = ' with oneDNN'  # the same gradients jitted with the CPU backend on: convolutions in oneDNN
LABEL_SMOOTHING = 0.1


def timm_backward(name: str) -> tuple[torch.nn.Module, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(randomised timm model after backward, images, labels, timm grads by key)."""
    torch.manual_seed(0)
    theirs = timm.create_model(name)  # drop rates are 0 by default
    randomize_(theirs, seed=len(name))
    x = np.random.default_rng(1).standard_normal((2, 64, 64, 3)).astype(np.float32)
    labels = np.array([3, 997])
    loss = torch.nn.functional.cross_entropy(theirs(nchw(x)), torch.from_numpy(labels), label_smoothing=LABEL_SMOOTHING)
    loss.backward()
    return theirs, x, labels, {key: p.grad.numpy() for key, p in theirs.named_parameters()}


FAST = {'dm_nfnet_f0', 'nf_resnet26'}  # the fast tier's (-m "not slow")


@pytest.fixture(
    scope='module',
    params=[
        pytest.param(name, marks=[] if name in FAST else [pytest.mark.slow])
        for name in ARCHITECTURES + [f'dm_nfnet_f0{ONEDNN}']
    ],
)
def grads(request):
    """(name, timm grads by key, our grads converted to timm keys and layout)."""
    name, onednn_kernels = request.param.removesuffix(ONEDNN), request.param.endswith(ONEDNN)
    theirs, x, labels, timm_grads = timm_backward(name)
    ours = from_timm(theirs)

    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)

    def loss(params: nnx.State) -> jax.Array:
        logits = nnx.merge(graphdef, params, rest)(jnp.asarray(x))
        return cross_entropy_loss(logits, jnp.asarray(labels), LABEL_SMOOTHING)

    # nf_regnet_b0's program takes longer to compile with the suite's fast-compile flags than to run op by op.
    grad = jax.grad(loss)
    if onednn_kernels:
        with cpu_backend():
            grad = jax.jit(grad)
            assert onednn.TARGETS['backward_weights'][0] in grad.lower(params).as_text()
            our_grads = grad(params)
    else:
        our_grads = (grad if name in OP_BY_OP else jax.jit(grad))(params)
    our_grads = to_timm({dotted_path(path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(our_grads)})
    yield request.param, timm_grads, our_grads
    del theirs, ours
    gc.collect()


def test_gradients_match_timm(grads):
    name, timm_grads, our_grads = grads
    assert our_grads.keys() == timm_grads.keys()
    errors = {key: relative_error(our_grads[key], timm_grads[key]) for key in timm_grads}
    worst = max(errors, key=errors.get)
    print(f'{name}: worst gradient {worst} relative error {errors[worst]:.2e} over {len(errors)} tensors')
    assert errors[worst] <= GRAD_RTOL, (worst, errors[worst])


@pytest.mark.slow
@pytest.mark.parametrize('exclude_head', [True, False], ids=['clip-mode-agc', 'head-too'])
def test_agc_matches_timm_on_a_whole_model(exclude_head):
    """On dm_nfnet_f0's real gradients: every kind of tensor (4-D, gains, biases, 0-d skip gains)."""
    name = 'dm_nfnet_f0'
    theirs, _, _, timm_grads = timm_backward(name)
    # Scale the gradients so that some units of every kind of tensor are clipped and others not.
    scaled = {key: np.asarray(g * 30.0) for key, g in timm_grads.items()}
    params = {key: p.detach().numpy() for key, p in theirs.named_parameters()}
    for key, p in theirs.named_parameters():
        p.grad = torch.from_numpy(scaled[key].copy())
    timm_adaptive_clip_grad(model_parameters(theirs, exclude_head=exclude_head), clip_factor=0.01, eps=1e-3)
    expected = {key: p.grad.numpy() for key, p in theirs.named_parameters()}

    tx = adaptive_clip_grad(0.01, eps=1e-3, **({} if exclude_head else {'exclude': None}))
    flax_params = convert_state_dict(params, name)
    flax_grads = convert_state_dict(scaled, name)
    clipped, _ = tx.update(flax_grads, tx.init(flax_params), flax_params)
    got = to_timm({key: np.asarray(value) for key, value in clipped.items()})

    errors = {key: relative_error(got[key], expected[key]) for key in expected}
    worst = max(errors, key=errors.get)
    print(f'AGC {name} exclude_head={exclude_head}: worst {worst} relative error {errors[worst]:.2e}')
    assert errors[worst] <= AGC_RTOL, (worst, errors[worst])
    changed = {key for key in expected if not np.array_equal(expected[key], scaled[key])}
    assert ('head.fc.weight' in changed) is not exclude_head
    # The check is only meaningful if gains are clipped per element: some elements, not all.
    gain = 'stages.2.3.conv2.gain'
    clipped_elements = expected[gain] != scaled[gain]
    assert 0 < clipped_elements.sum() < clipped_elements.size, 'scale the grads so that gains are partly clipped'
