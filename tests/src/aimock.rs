//! Harness for aimock (npm @copilotkit/aimock), a third-party OpenAI-compatible mock. Filled in by the wire work of issue 11.
