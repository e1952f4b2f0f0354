"""Blueberry: hardware-adaptive training of small dense and Mixture-of-Experts language models.

Sub-packages, one job each:
  system/      detects the hardware and describes it as capabilities
  ops/         numerical kernels chosen from those capabilities (FP8, bf16, fp32 matmuls)
  configs/     the run configuration, its presets and its validation
  data/        corpora, tokenizer, cache, datasets and resumable batch loaders
  models/      plain PyTorch dense and MoE transformers, generation, export
  optimizers/  Muon, Lion, the hybrid set-up and learning-rate schedules
  training/    the training loop, evaluation, checkpoints, metrics and plots
  cli/         the command line (`python train.py`, `python -m blueberry`)
"""

__version__ = "0.1.0"
