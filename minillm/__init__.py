"""minillm: a minimal, readable transformer framework (GPT-2 and LLaMA families).

CORE names the modules a reader learns from; every other module is a layer that uses the core and
that the core never imports, not even inside a function (tests/test_shape.py checks it; README's
"What is where" has the two tables).
"""

__version__ = "0.1.0"

CORE = (
    "minillm.config", "minillm.model", "minillm.kv_cache", "minillm.tokenizer",  # the model and its text
    "minillm.checkpoint", "minillm.quantized", "minillm.host_memory",  # the file format, its weight forms, the allocator
    "minillm.sampling", "minillm.generate",  # the decoding core
    "minillm.data", "minillm.device", "minillm.ddp",  # data, devices and data-parallel ranks
    "minillm.trainer", "minillm.train_config", "minillm.train_lock", "minillm.train_resume",  # the training loop
)
