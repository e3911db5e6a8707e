ColumnParallelLinear = Linear = RowParallelLinear = VocabParallelEmbedding = None  # placeholder
