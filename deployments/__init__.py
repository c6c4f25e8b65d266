"""Ray Serve applications of llmflow: the OpenAI-compatible app on the hf engine and the vLLM
app built with ray.serve.llm (they land with the promotion stage)."""
