"""Quantizers, the path-rule policy and the quantized layers."""
from bitbert_jax.quant.policy import ActQuant, QuantPolicy, WeightQuant, policy_from_name
from bitbert_jax.quant.quantizers import (activation_codes, asymmetric, binary, elastic_binary,
                                          from_codes, lsq, quantize_activation, quantize_weight,
                                          sign, symmetric, symmetric_clip, ternary, weight_codes)
