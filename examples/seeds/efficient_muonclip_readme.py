# axion66/efficient-muonclip, README "MuonClip" example, run against dist_muonclip.compat.
# Changed: the import line ("# changed:"). The README leaves model and dataloader to the reader:
# the "# glue:" line builds them (_seed001_model.py: the README's MHA module in a tiny model).
from dist_muonclip.compat import MuonClip  # changed: was "from muonclip import MuonClip"
import torch
from _seed001_model import build; model, dataloader = build()  # glue: the README's model and data

# Find >=2D parameters in the body of the network -- these should be optimized by Muon
muon_params = [p for p in model.body.parameters() if p.ndim >= 2]
# Find everything else -- these should be optimized by AdamW
adamw_params = ([p for p in model.body.parameters() if p.ndim < 2]
              + [*model.head.parameters(), *model.embed.parameters()])

muonclip = MuonClip(
    params=muon_params,
    attention_params=[model.body.layer1.attn, model.body.layer2.attn], # Note: attention_params should be your attention layer modules.
    mode='mha', # or 'mla'
    metadata={'w_q': 'weight_q', 'w_k': 'weight_k'}, # Match self.weight_q = nn.Linear inside your attn module.
    n_head=8,
    lr=0.02,
    momentum=0.95,
    rank=0,
    world_size=1
)
adamw = torch.optim.AdamW(adamw_params, lr=3e-4, betas=(0.90, 0.95), weight_decay=0.01)

for batch in dataloader:
    loss, s_max = model(batch) # Your model should output s_max too for each attention layers' heads.
    loss.backward()
    muonclip.step(s_max) # Applies both Muon and QK-Clip
    adamw.step()
    muonclip.zero_grad()
    adamw.zero_grad()
