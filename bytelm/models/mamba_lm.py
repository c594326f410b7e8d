"""The byte-level Mamba LM under its original names. The model itself is the general LM of
bytelm.models.lm (layer_pattern "M", the default); checkpoints and configs are unchanged."""

from bytelm.models.lm import LM, ModelConfig, generate, sample_next

MambaConfig = ModelConfig
MambaLM = LM

__all__ = ["MambaConfig", "MambaLM", "generate", "sample_next"]
