"""The model families, one file each: bert.py (BERT, RoBERTa, MiniLM), gpt2.py (GPT-2), llama.py (Llama, SmolLM2,
TinyLlama, Qwen2, Mistral). checkpoints.FAMILIES finds a family by config.json's model_type."""
