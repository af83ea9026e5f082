"""Golden values for the real Qwen2.5-Coder-0.5B-Instruct GGUF, from llama.cpp (an independent implementation,
llama-cpp-python 0.3.36 on the same file): the prompt's token ids and its greedy continuation with the stored
`output.weight` head. Every test that checks real tokens or text imports them from here."""

PROMPT = "def fibonacci(n):"
PROMPT_IDS = [750, 75698, 1445, 1648]  # llama.cpp's tokenization of PROMPT
LLAMA_CPP_GREEDY = '''def fibonacci(n):
    if n <= 0:
        return "Invalid input"
    elif n == 1:
        return 0
    elif n == 2:
        return 1
    else:
        a, b = 0, 1
        for _ in range(3, n + 1'''  # PROMPT and its first 64 greedy tokens, decoded

# Perplexity of the fp32 weights on the first 1000 tokens of CPython 3.11's Lib/heapq.py, as transformers,
# optimum + ONNX Runtime and onnxruntime-genai all measure it on this file's dequantized weights.
FP32_PERPLEXITY_HEAPQ = 9.170
