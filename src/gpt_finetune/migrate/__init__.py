"""Moving an organisation's OpenAI fine-tunes to this machine (``gpt-finetune migrate``).

The move, one step each, every step resumable and idempotent, its state in one directory:

    inventory  every job and fine-tuned model, their files, dates and days left -> manifest.json
    record     the old models' greedy answers to a prompt set, while they still serve
    retrain    one local job per succeeded OpenAI job, same hyperparameters, through the queue
    (alias)    each retrained model also answers to the OpenAI id it replaces
    compare    the local model against the recordings (and the references), with a report

The migration directory:

    manifest.json              the inventory (what OpenAI said, what was found on disk)
    files/<file id>.<ext>      training, validation and result files: downloaded, or the user's copies
    prompts/<key>.jsonl        the prompt set recorded for a model (fixed at its first record)
    recordings/<key>.jsonl     one answer per line, appended and flushed as it comes
    batches/<key>.json         the Batch API rounds of a model (input file, batch id, ingested)
    distill/<key>.jsonl        recordings as training data (``retrain --from-recordings``)
    compare/<key>/             the comparison: report.md, compare.json, plots

``<key>`` is the OpenAI job id of the model, or ``model-<hash>`` for a model without a visible
job. What each step has done is read back from these files and from the local store (a local
job carries the OpenAI job id in its metadata), never kept a second time.

This package sits above the services and the evaluation code and below the CLI: it is handed
an ``OpenAIBackend``-like source and the local ``Services``, and writes the store only through them.
"""
