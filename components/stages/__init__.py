"""The pipeline's stages, one module each (``python -m components.stages.<stage>``): ingest,
reports, similarity, pretrain, evaluate, publish, and the loss-weight sweep. A stage's helpers
sit beside it under a name that says which stage they serve (``pretrain_data``,
``evaluation_cells``, ``sweep_signal``, ...)."""
