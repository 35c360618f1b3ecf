"""Benchmarks for batch-poller: `make bench` (``python -m bench``) runs them all and writes bench/RESULTS.md.

They measure, on loopback against the package's simulator, what batch-poller costs and how it compares
with what users would otherwise run. They are not tests: they print numbers and never fail on a timing.

- `bench.api_economy`: requests per full refresh (automatic choice vs one retrieve each vs the floor);
- `bench.cpu`: client CPU per 10,000 batch refreshes vs a plain loop over the `openai` SDK;
- `bench.memory`: peak RSS of `batch-poller run` tracking 10,000 batches;
- `bench.delivery`: a burst of 5,000 events through the outbox to MQTT and a webhook vs raw publishing;
- `bench.startup`: process start to READY=1 with 10,000 tracked batches and 10,000 pending outbox rows.
"""
