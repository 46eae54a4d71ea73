"""Data: Megatron .bin/.idx files, tokenizers, preprocessing, GPT sample datasets, blending and the DP loader."""
