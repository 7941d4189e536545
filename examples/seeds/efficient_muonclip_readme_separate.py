# axion66/efficient-muonclip, README "Muon and QKClip separately" example, run against
# dist_muonclip.compat. Changed: the two import lines ("# changed:"). The "# glue:" line builds
# the model and dataloader the README leaves to the reader (_seed001_model.py).
from dist_muonclip.compat import Muon  # changed: was "from muon import Muon"
from dist_muonclip.compat import QKClip  # changed: was "from qk_clip import QKClip"
import torch
from _seed001_model import build; model, dataloader = build()  # glue: the README's model and data

muon_params = [p for p in model.body.parameters() if p.ndim >= 2]
adamw_params = ([p for p in model.body.parameters() if p.ndim < 2]
              + [*model.head.parameters(), *model.embed.parameters()])

muon = Muon(muon_params, lr=0.02, momentum=0.95, rank=0, world_size=1)
adamw = torch.optim.AdamW(adamw_params, lr=3e-4, betas=(0.90, 0.95), weight_decay=0.01)
qkclip = QKClip(
    attention_params=[model.body.layer1.attn, model.body.layer2.attn],
    mode='mha',
    metadata={'w_q': 'weight_q', 'w_k': 'weight_k'},
    n_head=8,
    rank=0,
    world_size=1
)

for batch in dataloader:
    loss, s_max = model(batch)
    loss.backward()
    
    # Instead of muonclip.step()
    muon.step()
    qkclip.step(s_max) # Apply QK-Clip after Muon
    adamw.step()
    
    muon.zero_grad()
    adamw.zero_grad()
