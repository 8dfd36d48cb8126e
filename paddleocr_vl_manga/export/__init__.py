"""Checkpoint -> a folder laid out like the base model; GGUF through llama.cpp's converter."""
