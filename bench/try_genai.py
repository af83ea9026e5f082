"""Load an export with onnxruntime-genai and generate greedily (genai needs its own environment):

    python -m venv /tmp/genai-venv && /tmp/genai-venv/bin/pip install onnxruntime-genai==0.18.0
    /tmp/genai-venv/bin/python bench/try_genai.py exports/qwen2-0.5b-int4
"""
import sys, time
import onnxruntime_genai as og
path = sys.argv[1]
t = time.time()
model = og.Model(path)
print('loaded', round(time.time() - t, 1), 's')
tok = og.Tokenizer(model)
ids = tok.encode("def fibonacci(n):")
print('ids', list(ids))
params = og.GeneratorParams(model)
params.set_search_options(max_length=68, do_sample=False)
gen = og.Generator(model, params)
gen.append_tokens(ids)
out = []
while not gen.is_done():
    gen.generate_next_token()
    out.append(gen.get_next_tokens()[0])
print(repr(tok.decode(out)[:200]))
