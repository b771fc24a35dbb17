"""The step benchmark's parts; ``bench/step_bench.py`` is its command line and describes the variants and the FLOP
convention.

- :mod:`.measure`: timing, peak memory, the device, the LLM FLOPs and throughput of a row;
- :mod:`.setup`: variant names, presets, and what every variant shares (config, text tokenizer, one fixed batch);
- :mod:`.variants`: the matmul ceiling, the loader, the plain-PyTorch reference, the engine, and plan mode;
- :mod:`.report`: the engine/reference ratio row, an earlier run's ceiling, and the results table.
"""
