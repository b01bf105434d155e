"""Serving runtime (imported as ``xytune.runtime``): model, KV cache, scheduler, engine, server."""
