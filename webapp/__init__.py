"""HTTP and WebSocket tier (never imports torch)."""
