"""Pure leaf of helora: messages, wire codec, LoRA tensor operations, settings, errors."""
