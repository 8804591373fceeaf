"""What the stages share: parameters (``config``, ``profiles``), the stage runner (``stage``),
storage (``storage``, a stage's output folder in ``stage_storage``, the shard format in
``shards``, remote inputs in ``remote_sources``), tracking (``tracking``, ``lineage``) and the
Ray runtime (``runtime``, ``ports``, ``preflight``, ``secrets``). Nothing here imports a
stage."""
