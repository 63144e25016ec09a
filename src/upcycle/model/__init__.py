"""The model: its config, the dense and MoE Transformer, the MoE layer and its kernels, and the bridge between
Hugging Face checkpoints and our parameters."""
