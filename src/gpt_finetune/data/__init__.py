"""Data tools: read raw data, convert it to OpenAI chat JSONL, validate it, count its tokens."""
