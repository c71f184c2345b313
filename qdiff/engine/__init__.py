"""The measuring engine: sessions, batching, taps, folding and the measuring loop."""
