"""Live events (events.md): per-session durable logs, the team stream, push channels."""
