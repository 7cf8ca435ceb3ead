"""What differs per kind of base layer and per engine.

- ``linear``: dense ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2 family, weight stored in x out),
  and the dispatch from any base layer to its dense weight;
- ``bnb``: bitsandbytes 4-bit and 8-bit layers;
- ``zero``: DeepSpeed ZeRO-3 partitioned parameters (gather, full size);
- ``dtypes``: the one vocabulary of dtype names;
- ``accelerate``: the Accelerate/DeepSpeed engine (prepare, clip, checkpoints, CPU workarounds).

Nothing here knows about SoRA: ``core`` builds on these.
"""
