"""The training worker: a process adapter beside ``cli/`` and ``server/``.

``runner`` is the detached process that trains queued jobs one at a time; ``train_job`` is one
job's training process. Both read and write jobs only through the services, and call the engine
(``local.trainer``) to train.
"""
