"""Every accelerator figure in one short run: parity on the device, speed against timm, training, sharding.

    benchmarks/accelerator.sh [--quick] [--json accelerator.json] [--markdown accelerator.md] [--force]
    python -m benchmarks.accelerator [--quick] [--device auto|cpu|gpu] [--budget SECONDS] [--steps parity,...]

The steps (`steps`), each with its own time budget (`settings`):

1. `parity`: dm_nfnet_f0, eca_nfnet_l0 and nf_regnet_b0 with every tensor randomised
   (`benchmarks.random_weights`, as the test suite does), run on the device against timm in float32
   on the CPU (the test suite's reference): the logits, pre-logits, forward_features and the feature
   taps, and the folded inference path's logits, at 'highest' matmul precision (what reproduces timm)
   and at JAX's default precision (TF32 on NVIDIA GPUs). timm itself on the device is compared with
   the same reference, with TF32 off and with torch's defaults.
2. `vs_timm`: `benchmarks.vs_timm`'s measurements in bfloat16 and float32 at several batch sizes
   (timm under AMP with channels_last, eager and torch.compile). torch.compile takes long to compile
   each shape, so it runs only where the step's budget leaves room for it.
3. `train_step`: `benchmarks.train_step`'s step of both frameworks on the same weights and batch.
4. `sharded_inference`: `benchmarks.sharded_inference`'s one device against all of them.

The steps run in a child process (`worker`), one after another; this process (`runner`) watches
it, kills it when a step runs past its budget (or it dies) and starts a fresh one for the remaining
steps. The child saves its results after every measurement, so a killed or failed step keeps what it
had, and the runner writes the JSON and markdown reports (`reports`) after every change: an
interrupted run still leaves every figure measured so far. Without a GPU everything runs on the CPU,
with nfnet_jax's CPU backend on (as the commands run), with tiny sizes under `--quick`.
"""
