"""The generation side: vLLM engines as Ray actors (`worker.GenerationWorker`), their data-parallel group
(`group.GenerationGroup`), what they return (`types.Rollout`) and how they fail (`errors`)."""
