"""Blueberry: hardware-adaptive training of small language models, and the tools to use what you trained.

Sub-packages, one job each, each importing only from those above it:
  system/      detects the hardware once and describes it as capabilities
  ops/         numerical kernels chosen from those capabilities (fused cross-entropy, grouped matmuls, FP8)
  configs/     the run configuration: one dataclass per concern, presets, files, validation
  data/        corpora, tokenizers, cache, datasets, chat data and resumable batch loaders
  models/      plain PyTorch models: dense, MoE, Mamba-2, retention, hybrids; sampling
  runs/        a run directory: its layout, its checkpoints (single-file and sharded), loading any run
  export/      Hugging Face and GGUF conversion
  optimizers/  Muon, Lion, the hybrid set-up and learning-rate schedules
  training/    the training loop, evaluation, FP8, checkpointing and distributed transforms, metrics
  inference/   the generation engine, quantizing a run, speculative decoding, the server and the chat
  evaluation/  task scoring, generation metrics, the lm-eval backend and run comparison
  cli/         the command line (`python train.py`, `python -m blueberry`)
"""

import logging


class _QuietTorchaoImport(logging.Filter):
    """torchao (FP8, int4; transformers imports it when installed) warns at import that its CUDA-only
    kernel libraries cannot load on a machine without them, and torch that torchao registers enums the
    old way; both are expected here and say nothing about what Blueberry will do."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Failed to load ") or "register_constant() on Enum" in message)


for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_QuietTorchaoImport())

__version__ = "0.2.0"
