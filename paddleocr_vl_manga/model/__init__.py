"""Loading PaddleOCR-VL checkpoints (release prompt checked), batched generation, LoRA, quantization."""
