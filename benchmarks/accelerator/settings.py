"""What each step of the accelerator run measures and its time budget: the defaults, and the command line's changes."""

from __future__ import annotations

import argparse
from typing import Any

MIN_STEP_BUDGET_S = 10.0  # a step with less of the run's time left is skipped


def default_settings(gpu: bool, quick: bool) -> dict[str, Any]:
    """What each step runs and its budget in seconds, for a GPU or a CPU, full or `--quick`.

    On a GPU the budgets fit the run in 8 minutes with the watchdog's grace (`runner.GRACE_S`) and the
    child process's start (4 minutes with `--quick`). On a CPU they only stop a run that hangs.
    """
    if gpu and not quick:
        return dict(
            budget_s=450,
            parity=dict(budget_s=65, model='dm_nfnet_f0', size=[67, 53], batch=2, precisions=['highest', 'default']),
            train_step=dict(
                budget_s=135,
                model='dm_nfnet_f0',
                size=224,
                runs=[['bfloat16', 256], ['float32', 64]],
                steps=10,
                rounds=3,
                timm=True,
            ),
            vs_timm=dict(
                budget_s=140,
                model='dm_nfnet_f0',
                size=224,
                dtypes=['bfloat16', 'float32'],
                batches=[256, 32, 1],
                repeats=10,
                compile_dtypes=['bfloat16'],  # torch.compile with AMP, where the budget leaves room
                ceiling_budget_s=20,
            ),
            program_check=dict(budget_s=25, model='dm_nfnet_f0', size=224),
            sharded_inference=dict(budget_s=25, model='dm_nfnet_f0', batch_per_device=64, size=224, runs=5),
            remat_memory=dict(budget_s=60, model='dm_nfnet_f3', size=320, batch=8),
        )
    if gpu:
        return dict(
            budget_s=220,
            parity=dict(budget_s=50, model='dm_nfnet_f0', size=[67, 53], batch=2, precisions=['highest', 'default']),
            train_step=dict(
                budget_s=55, model='dm_nfnet_f0', size=224, runs=[['bfloat16', 256]], steps=5, rounds=2, timm=False
            ),
            vs_timm=dict(
                budget_s=55,
                model='dm_nfnet_f0',
                size=224,
                dtypes=['bfloat16'],
                batches=[32, 1],
                repeats=5,
                compile_dtypes=[],
                ceiling_budget_s=20,
            ),
            program_check=dict(budget_s=20, model='dm_nfnet_f0', size=224),
            sharded_inference=dict(budget_s=10, model='dm_nfnet_f0', batch_per_device=32, size=224, runs=3),
            remat_memory=dict(budget_s=30, model='dm_nfnet_f0', size=224, batch=32),
        )
    if not quick:  # dm_nfnet_f0 at small sizes
        return dict(
            budget_s=2100,
            parity=dict(budget_s=300, model='dm_nfnet_f0', size=[67, 53], batch=2, precisions=['highest']),
            train_step=dict(
                budget_s=600, model='dm_nfnet_f0', size=128, runs=[['float32', 2]], steps=2, rounds=2, timm=True
            ),
            vs_timm=dict(
                budget_s=600,
                model='dm_nfnet_f0',
                size=128,
                dtypes=['float32', 'bfloat16'],
                batches=[4, 1],
                repeats=3,
                compile_dtypes=[],
                ceiling_budget_s=20,
            ),
            program_check=dict(budget_s=60, model='dm_nfnet_f0', size=128),
            sharded_inference=dict(budget_s=240, model='dm_nfnet_f0', batch_per_device=2, size=128, runs=2),
            remat_memory=dict(budget_s=300, model='dm_nfnet_f0', size=128, batch=2),
        )
    return dict(  # test_nfnet, tiny: the test suite's run of the whole command
        budget_s=660,
        parity=dict(budget_s=120, model='test_nfnet', size=[67, 53], batch=2, precisions=['highest']),
        train_step=dict(budget_s=180, model='test_nfnet', size=32, runs=[['float32', 2]], steps=2, rounds=1, timm=True),
        vs_timm=dict(
            budget_s=120,
            model='test_nfnet',
            size=64,
            dtypes=['float32'],
            batches=[2],
            repeats=2,
            compile_dtypes=[],
            ceiling_budget_s=0,  # the smallest matmul: the ceiling's figure matters less than the test's time
        ),
        program_check=dict(budget_s=60, model='test_nfnet', size=64),
        sharded_inference=dict(budget_s=120, model='test_nfnet', batch_per_device=2, size=64, runs=2),
        remat_memory=dict(budget_s=60, model='test_nfnet', size=64, batch=2),
    )


def resolve_settings(args: argparse.Namespace, gpu: bool) -> dict[str, Any]:
    """`default_settings` with the budgets the command line gives (`runner.parse_args`)."""
    settings = default_settings(gpu, args.quick)
    if args.budget is not None:
        settings['budget_s'] = args.budget
    for item in args.step_budget:
        step, _, seconds = item.partition('=')
        settings[step]['budget_s'] = float(seconds)
    return settings
