"""Corpus pipeline on Ray Data: read, clean, deduplicate, decontaminate, tokenize, pack, stream."""
