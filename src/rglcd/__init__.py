"""rglcd: Reward Guided Latent Consistency Distillation (Li, Feng, Chen, Wang, TMLR 2024)."""

__version__ = "0.1.0"
