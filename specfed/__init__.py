"""SpecFed: federated LLM inference with speculative decoding and top-K transmission."""
