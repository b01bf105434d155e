"""The model: its config, weights and tokenizer, the Llama forward, and the GEMM and attention kernels it binds."""
