"""Measuring a model: perplexity, fidelity to the dense model, speed, parameter and byte cost, zero-shot tasks
(lm-eval bridge), and the eval command's table. May import: errors, modeling, data."""
