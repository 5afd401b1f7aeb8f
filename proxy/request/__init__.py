"""One shaped request on its way through: forward, the dialects' cap fields, the body sent
upstream, the SSE accounting and the OpenAI-style error bodies."""
