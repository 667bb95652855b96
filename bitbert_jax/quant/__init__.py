"""Quantizers, the path-rule policy and the quantized layers."""
from bitbert_jax.quant.policy import ActQuant, QuantPolicy, WeightQuant, policy_from_name
from bitbert_jax.quant.quantizers import (asymmetric, binary, elastic_binary, lsq,
                                          quantize_activation, quantize_weight, sign, symmetric,
                                          symmetric_clip, ternary)
