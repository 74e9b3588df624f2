"""Model computation shared by every stage: decoding loops, prompt/completion batching, precision, FSDP sharding."""
