"""Quantizers, the path-rule policy and the quantization-aware layers."""
from bitbert_jax.quant.policy import ActQuant, QuantPolicy, WeightQuant, policy_from_name
from bitbert_jax.quant.quantizers import (asymmetric, binary, quantize_activation, quantize_weight,
                                          sign, symmetric, ternary)
