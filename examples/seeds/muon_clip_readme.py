# GAD-cell/muon-clip, README "basic example", run against dist_muonclip.compat.
# Changed lines, each marked "# changed:": the import line, AutoConfig.from_pretrained (a tiny Qwen3
# config: no download) and the commas the README's MuonConfig(...) call lacks (a SyntaxError as
# printed). The README stops at model.train(); the lines after "# glue:" build the model it
# assumes and train a few steps on random tokens.
from dist_muonclip.compat import MuonClip, MuonConfig  # changed: was "from muon import MuonClip, MuonConfig"
from transformers import AutoConfig
from _offline import tiny_config  # changed: offline stand-in
# model config can also be a dic with at least num_key_value_heads,num_attention_heads and head_dim keys
model_config = tiny_config("qwen3")  # changed: was AutoConfig.from_pretrained("{hf_model}")

# glue: the model the README assumes
import torch
from transformers import AutoModelForCausalLM
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(model_config)

muon_config = MuonConfig(
unified_lr=True, # If true, use the same learning rate for both Muon and Adam parts of the optimizer.
lr=1e-5,
lr_muon=1e-4, # Only used if unified_lr is False
lr_adam=1e-4,
muon_beta=0.95,
muon_decay=0.0,
ns_steps=5, #Number of newton-shulz interations. Increase for more precision during orthogonalization
adam_betas=(0.9, 0.95),
adam_decay=0.0,
adam_eps=1e-10,
enable_clipping=True,
clipping_layers_mapping={"q_proj": "q_proj", "k_proj": "k_proj"}, # If using a special model with non standard q_proj and k_proj names. Just change the value to the desired name.
clipping_threshold=50.0,
clipping_alpha=0.5,
log_max_logits=True,
log_dir="./logs",
cans_ortho=False, # Experimental: Use CANS orthogonalization. Suggest to disable it for now.
estimate_lower_bound=False
)
optimizer = MuonClip(model, model_config, muon_config)
model.train() #You must call model.train() after defining the optimizer so that hooks are registered correctly.

# glue: a few steps on random tokens
g = torch.Generator().manual_seed(1)
for step in range(3):
    ids = torch.randint(0, model_config.vocab_size, (2, 16), generator=g)
    loss = model(input_ids=ids, labels=ids).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step}: loss {loss.item():.4f}")
