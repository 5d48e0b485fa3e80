"""The model servers: the OpenAI-compatible backend and the offline one, how their answers and errors read,
their prices and image-token rules."""
