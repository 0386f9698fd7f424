"""The only importer of pika: topology, connections, confirmed publishing, consuming."""
