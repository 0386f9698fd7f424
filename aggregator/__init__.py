"""The aggregator: a pure core (state machine + strategies) and the service around it."""
