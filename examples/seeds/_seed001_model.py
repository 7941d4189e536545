"""The model axion66/efficient-muonclip's README assumes, for its two optimizer examples.

``MHA`` is the README's attention module that tracks s_max, verbatim. The README's optimizer
examples then use ``model.body.layer1.attn``, ``model.body.layer2.attn``, ``model.head``,
``model.embed`` and ``loss, s_max = model(batch)``, and iterate over a ``dataloader``; those are
glue written here (a token embedding, two residual attention blocks, a next-token loss, three
random batches). The README's ``TransformerModel`` is not used: it has none of these attributes
and needs an undefined ``vocab_size`` and ``compute_loss``.
"""
import torch
import torch.nn as nn
import math


# ---- README, verbatim
class MHA(nn.Module):
    def __init__(self, d_model, n_head):
        super().__init__()
        self.d_model = d_model
        self.n_head = n_head
        self.d_head = d_model // n_head
        
        self.weight_q = nn.Linear(d_model, d_model, bias=False)
        self.weight_k = nn.Linear(d_model, d_model, bias=False)
        self.weight_v = nn.Linear(d_model, d_model, bias=False)
        self.weight_o = nn.Linear(d_model, d_model, bias=False)
    
    def forward(self, x):
        batch_size, seq_len, d_model = x.shape
        
        Q = self.weight_q(x)
        K = self.weight_k(x)
        V = self.weight_v(x)
        
        Q = Q.view(batch_size, seq_len, self.n_head, self.d_head).transpose(1, 2)
        K = K.view(batch_size, seq_len, self.n_head, self.d_head).transpose(1, 2)
        V = V.view(batch_size, seq_len, self.n_head, self.d_head).transpose(1, 2)
        
        scores = (Q @ K.transpose(-2, -1)) / math.sqrt(self.d_head)
        
        # s_max per head = (1/sqrt(d)) * max logit across batch and sequence
        s_max_per_head = []
        for h in range(self.n_head):
            max_logit = scores[:, h, :, :].max().item()
            s_max_per_head.append(torch.tensor(max_logit))
        
        a = torch.softmax(scores, dim=-1)
        a = a @ V
        a = a.transpose(1, 2).contiguous().view(batch_size, seq_len, d_model)
        output = self.weight_o(a)
        
        return output, s_max_per_head


# ---- glue
VOCAB, D_MODEL, N_HEAD = 96, 64, 8


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = MHA(D_MODEL, N_HEAD)
        self.norm = nn.LayerNorm(D_MODEL)

    def forward(self, x):
        out, s_max = self.attn(self.norm(x))
        return x + out, s_max


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1, self.layer2 = Block(), Block()


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.body = Body()
        self.head = nn.Linear(D_MODEL, VOCAB)

    def forward(self, batch):
        x = self.embed(batch[:, :-1])
        s_max = []
        for layer in (self.body.layer1, self.body.layer2):
            x, s = layer(x)
            s_max.append(s)
        logits = self.head(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        return loss, s_max


def build(seed: int = 0):
    """The model and a three-batch dataloader of random tokens."""
    torch.manual_seed(seed)
    model = Model()
    g = torch.Generator().manual_seed(seed + 1)
    dataloader = [torch.randint(0, VOCAB, (2, 17), generator=g) for _ in range(3)]
    return model, dataloader
