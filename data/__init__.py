"""Training data: MDS shards (``records``, ``mds``), task processors (``tasks``), image transforms
(``images``), collation (``collate``) and the resumable multi-task streaming loaders (``loader``:
``build_train_loader`` / ``build_eval_loader`` over a ``config.DataConfig``)."""
