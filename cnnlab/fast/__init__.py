"""Speed, in one layer below both training engines.

- `plan`: which layers of a model run which kernel (tiling pools with their
  ReLU, LeNet-5's first convolution with its pool, small-batch convolutions).
- `tiled_maxpool`, `conv_pool`: those kernels, as compiled loops (numba), each
  with its forward and its gradients as plain functions of tensors.
- `forward`: a model's forward pass on the plan, for autograd and inference.
- `slices`: a batch split across a CPU's cores, each running the whole step
  on its own slice.

The autograd engine uses `forward` and `slices`; the hand-written engine uses
`plan` and the kernels through its fused layers (`cnnlab.backprop.fused`) and
`slices`. Both switch them on and off with the same options (`fast=`,
`slices=`). Nothing here imports the engines, the training loop or anything
above them.
"""
