"""Export (`minilab export`: HF directory, GGUF) and quantization (`minilab quantize`)."""
