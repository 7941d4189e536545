# GAD-cell/muon-clip, src/test/test.py, run against dist_muonclip.compat.
# Changed lines, each marked "# changed:": the import line, and the three from_pretrained calls
# (a tiny Qwen3 built from a config and a character tokenizer: no download).
from transformers import AutoTokenizer, AutoModelForCausalLM, AutoConfig
import torch
import os
import sys
import re
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from dist_muonclip.compat import MuonClip, MuonConfig  # changed: was "from muon import MuonClip, MuonConfig"
from _offline import offline_tokenizer, tiny_config  # changed: offline stand-ins

model_name = "Qwen/Qwen3-0.6B"  
tokenizer = offline_tokenizer()  # changed: was AutoTokenizer.from_pretrained(model_name)
config = tiny_config("qwen3")  # changed: was AutoConfig.from_pretrained(model_name)
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # changed: was from_pretrained(model_name, device_map="auto", torch_dtype=torch.bfloat16, cache_dir=...)
muonconfig = MuonConfig()
optimizer = MuonClip(model, config, muonconfig)

model.train()
prompt = "The capital of France is"
inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
labels = inputs["input_ids"].clone()
inputs["labels"] = labels


outputs = model(**inputs)
loss = outputs.loss

print(f"Dummy loss: {loss.item()}")

# Optimizer
optimizer.zero_grad()
loss.backward()
optimizer.step()


model.eval()
