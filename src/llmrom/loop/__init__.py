"""The sequential block loop (pipeline.py) and what it needs: block-0 capture, activation stores, block sources
(a model in memory, a GGUF file), the streaming driver, the run report.
May import: factor, modeling, data, eval, plan."""
