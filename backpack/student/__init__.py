"""Students: the Autopilot (a frozen base with LoRA adapters, or a smaller copy trained in full), the
tokenised training examples built from a dataset, and (next) the Ray Train loop, registry and server."""
