"""Distillation: losses, layer maps and the stages."""
