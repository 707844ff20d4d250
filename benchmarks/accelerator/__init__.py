"""Every accelerator figure in one run of a few minutes, with the machine's python3 as it is.

    python3 -m benchmarks.accelerator --out accelerator-report [--force] [--quick]

Run from the repository's root: nothing is installed and nothing is downloaded, and the run imports
only what a GPU machine's Python with jax (and its CUDA plugin), flax, optax, torch and timm has
(no grain). It writes `accelerator.json` and `accelerator.md` into the `--out` folder after every
change, and the optimised programs it checked into its `programs/` folder. The steps, in order,
each with its own time budget (`settings`; on a GPU they fit 8 minutes):

1. `parity`: dm_nfnet_f0 with every tensor randomised (`benchmarks.random_weights`) on the device
   against timm float32 on the CPU: logits, pre-logits, forward_features, the feature taps and the
   folded inference path's logits, at 'highest' precision and at JAX's default (TF32 on NVIDIA
   GPUs), all in one compiled program; timm on the device with TF32 off and with its defaults.
2. `train_step`: a bfloat16 step at batch 256 and a float32 one at 64, 224 px: the device's time
   per step and the host's time per call of `nfnet_jax.train.train_step`, against the same step
   as a plain `jax.jit` and against timm eager.
3. `vs_timm`: `benchmarks.vs_timm`'s images/s in bfloat16 and float32 at batch 256, 32 and 1
   against timm eager, channels_last and, where the budget leaves room, torch.compile with AMP.
   The report's "Compile times" then lists every JAX compilation of the steps so far (trace,
   lowering, XLA) and torch.compile's first calls.
4. `program_check`: the optimised programs of the steps before (`programs`) hold nothing that only
   the CPU backend puts there: no conditional, loop, CPU library call, zero residual or split
   grouped convolution.
5. `sharded_inference`: one device against a mesh of all of them; skipped with one device.
6. `remat_memory`: `benchmarks.remat_memory` on the device: dm_nfnet_f3's training step at batch 8,
   320 px, compiled plain and with per-block gradient checkpointing; XLA's planned bytes of each.

The steps run in a child process (`worker`), one after another; this process (`runner`) watches
it, kills it when a step runs past its budget (or it dies) and starts a fresh one for the remaining
steps. The child saves its results after every measurement, so a killed or failed step keeps what it
had, and the runner writes the reports (`reports`) after every change: an interrupted run still
leaves every figure measured so far. Without a GPU everything runs on the CPU, with nfnet_jax's CPU
backend on (as the commands run), on dm_nfnet_f0 at small sizes, or on test_nfnet with `--quick`.
"""
