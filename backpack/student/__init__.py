"""Students: the Autopilot (a frozen base with LoRA adapters, or a smaller copy trained in full), the training
examples built from dataset rows, the Ray Train loops (batch and continual), checkpoints, the checks before
training, and the registry of versions."""
