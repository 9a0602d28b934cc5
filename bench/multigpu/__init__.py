"""Multi-GPU initialization benchmark: one process against several, DDP and FSDP2 (bench/multigpu/README.md)."""
