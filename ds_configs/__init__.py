"""DeepSpeed config templates (``zero3``, ``zero3_offload``, ``zero2``), installed with ett_ds as package data.

``engine.ds_config`` names one of them (or a path to your own JSON); ``ett_ds.engine.deepspeed`` fills in every
"auto" value from the config tree before DeepSpeed sees it. This file only makes the folder installable.
"""
