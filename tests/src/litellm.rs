//! Harness for the LiteLLM proxy (PyPI), a third-party OpenAI-compatible peer. Filled in by the wire work of issue 11.
