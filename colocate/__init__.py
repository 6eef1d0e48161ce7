"""colocate: RL for language models with training and inference colocated on the same GPUs."""
