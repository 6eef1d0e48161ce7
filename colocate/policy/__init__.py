"""The policy side: FSDP2 training workers (`worker.PolicyWorker`), their Ray group (`group.PolicyGroup`),
the GRPO loss (`grpo_loss`) and the learning-rate schedule (`lr_schedule`)."""
