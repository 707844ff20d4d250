"""What each step of the accelerator run measures and its time budget: the defaults, and the command line's changes."""

from __future__ import annotations

import argparse
from typing import Any

MIN_STEP_BUDGET_S = 10.0  # a step with less of the run's time left is skipped
FAMILIES = ['dm_nfnet_f0', 'eca_nfnet_l0', 'nf_regnet_b0']  # one model per NFNet family for the parity step


def default_settings(gpu: bool, quick: bool) -> dict[str, Any]:
    """What each step runs and its budget in seconds, for a GPU or a CPU, full or `--quick`.

    On a GPU the budgets fit 8 minutes (4 with `--quick`). On a CPU they only stop a run that hangs:
    compiling even test_nfnet is slow on a small, busy machine.
    """
    if gpu:
        full = not quick
        return dict(
            budget_s=480 if full else 240,
            parity=dict(
                budget_s=100 if full else 55,
                models=FAMILIES if full else FAMILIES[:1],
                sizes=[[67, 53], [64, 64]] if full else [[67, 53]],
                batch=2,
                precisions=['highest', 'default'],
            ),
            vs_timm=dict(
                budget_s=210 if full else 85,
                model='dm_nfnet_f0',
                size=256,
                dtypes=['bfloat16', 'float32'] if full else ['bfloat16'],
                batches=[32, 256, 1] if full else [32, 1],
                repeats=10 if full else 5,
                compile='auto' if full else 'none',
            ),
            train_step=dict(budget_s=75 if full else 45, model='dm_nfnet_f0', batch=32, size=192, steps=5),
            sharded_inference=dict(
                budget_s=45 if full else 30, model='dm_nfnet_f0', batch_per_device=64, size=256, runs=5
            ),
        )
    if not quick:  # dm_nfnet_f0 at small sizes
        return dict(
            budget_s=1800,
            parity=dict(budget_s=600, models=FAMILIES, sizes=[[67, 53], [64, 64]], batch=2, precisions=['highest']),
            vs_timm=dict(
                budget_s=600,
                model='dm_nfnet_f0',
                size=128,
                dtypes=['float32', 'bfloat16'],
                batches=[1, 4],
                repeats=3,
                compile='none',
            ),
            train_step=dict(budget_s=300, model='dm_nfnet_f0', batch=2, size=128, steps=2),
            sharded_inference=dict(budget_s=300, model='dm_nfnet_f0', batch_per_device=2, size=128, runs=2),
        )
    return dict(
        budget_s=900,
        parity=dict(budget_s=240, models=['test_nfnet'], sizes=[[67, 53]], batch=2, precisions=['highest']),
        vs_timm=dict(
            budget_s=240, model='test_nfnet', size=64, dtypes=['float32'], batches=[2], repeats=2, compile='none'
        ),
        train_step=dict(budget_s=240, model='test_nfnet', batch=2, size=64, steps=2),
        sharded_inference=dict(budget_s=180, model='test_nfnet', batch_per_device=2, size=64, runs=2),
    )


def resolve_settings(args: argparse.Namespace, gpu: bool) -> dict[str, Any]:
    """`default_settings` with the budgets, models and vs_timm's shapes the command line names (`runner.parse_args`)."""
    settings = default_settings(gpu, args.quick)
    if args.budget is not None:
        settings['budget_s'] = args.budget
    for item in args.step_budget:
        step, _, seconds = item.partition('=')
        settings[step]['budget_s'] = float(seconds)
    if args.parity_models:
        settings['parity']['models'] = args.parity_models
    if args.model:
        for step in ('vs_timm', 'train_step', 'sharded_inference'):
            settings[step]['model'] = args.model
    for key in ('batches', 'dtypes', 'size', 'compile'):
        if getattr(args, key) is not None:
            settings['vs_timm'][key] = getattr(args, key)
    return settings
