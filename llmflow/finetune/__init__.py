"""The finetune stage's logic: input checks, batches, the worker loop, the trainer, the export."""
