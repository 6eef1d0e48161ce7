"""The inference side: building a vLLM engine and loading refit weights into its workers."""
