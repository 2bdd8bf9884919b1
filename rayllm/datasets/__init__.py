"""Tokenized datasets: chat/instruction data with response-only loss masks, bundled tasks."""
