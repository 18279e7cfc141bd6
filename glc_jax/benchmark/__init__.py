"""Benchmarks: the controlled comparison matrix (`python -m glc_jax.benchmark`) and the
train-step throughput report (`python -m glc_jax.benchmark.throughput`)."""
