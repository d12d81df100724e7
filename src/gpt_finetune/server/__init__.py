"""``gpt-finetune serve``: OpenAI's files, fine-tuning, models and chat-completions API over the
local backend. An adapter, like ``cli/``: it calls the services and never imports the CLI."""

from .app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
