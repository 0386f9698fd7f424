"""The worker: model + peft at a given rank, data partitions, local training, the client loop."""
