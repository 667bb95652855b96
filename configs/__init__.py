"""The pipeline configs, shipped in the package as bitbert_jax.configs (`--config=xtc:...`)."""
