"""The training library that the train and retrain stages share (neither imports the other).

  encodings    the cache of VAE posteriors and text embeddings, computed once per crop and caption
  batches      the batch plan (aspect buckets, repeats, epochs, DDP shares) and device batches
  state        AdaLoRA around the transformer, AdamW, the lr schedule, the rank allocator, the EMA
  step         the flow-matching loss and one optimizer step
  validation   the validation loss at fixed noise and the sample images rendered while training
  checkpoints  resumable checkpoints (sealed by `sealing`) and the fingerprint a resume must match
  export       the adapter, the plain LoRA and its model card (`lora_card`), ranks, curves, metrics
  loop         the loop itself, top to bottom: data -> plan -> model -> steps -> export
"""
