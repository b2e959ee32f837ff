"""The model families, one file each: bert.py (BERT, RoBERTa, MiniLM), gpt2.py (GPT-2), llama.py (Llama 2/3.x,
SmolLM2, TinyLlama, Qwen2, Qwen3, Mistral), gemma.py (Gemma 2, Gemma 3 text: Llama's attention with Gemma's
switches). checkpoints.FAMILIES finds a family by config.json's model_type."""
