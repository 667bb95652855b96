"""The one exception type for bad user input: its message names the culprit and the valid choices.

Defined in `bitbert_serve` (the JAX-free serving package this distribution also ships), so the
serving code and the training code raise one and the same class.
"""
from bitbert_serve.errors import BitbertError  # noqa: F401
