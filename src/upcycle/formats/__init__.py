"""On-disk formats: safetensors reading and writing, the Hugging Face layouts of every model family we read and
write, our training checkpoints as read by every command, and the tensor-source contract."""
