"""Offline dataset tools: `lemur data synth` (synth/), `lemur data import` (parquet_import.py) and
`lemur data inspect` (inspect.py), and the shard writer they share. The trainer never imports these."""
