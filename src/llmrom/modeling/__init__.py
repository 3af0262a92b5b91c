"""Models in and out: the factorized modules (factorized.py, written verbatim into every saved folder),
architecture layouts, saving and loading folders, shards, packaged real models. May import: errors only."""
