"""The engine: requests, the KV cache, the scheduler and its policies, sampling, speculative verify, the step
predictor, and the engine loop in a thread (`async_engine`) or its own process (`core`)."""
