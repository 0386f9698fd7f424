"""helora: asynchronous, rank-heterogeneous federated LoRA fine-tuning over RabbitMQ.

This package is the composition root (CLI, demo); the parts live in helora.shared,
helora.broker, helora.aggregator and helora.worker.
"""

__version__ = "0.1.0"
