"""nanoGPT's model.py, re-implemented from its documented layout and reduced to what tests and benchmarks need:
module names, pre-LN blocks, exact GELU, tied lm_head, optional biases, the tril mask buffer of the non-flash path.

Imports only torch, so that a benchmark process using it starts as fast as nanoGPT's train.py does.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F


class RefLayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class RefAttention(nn.Module):
    def __init__(self, a, flash):
        super().__init__()
        self.c_attn = nn.Linear(a["n_embd"], 3 * a["n_embd"], bias=a["bias"])
        self.c_proj = nn.Linear(a["n_embd"], a["n_embd"], bias=a["bias"])
        self.n_head, self.flash = a["n_head"], flash
        if not flash:  # nanoGPT's slow path keeps its causal mask as a (persistent) buffer named "bias"
            bs = a["block_size"]
            self.register_buffer("bias", torch.tril(torch.ones(bs, bs)).view(1, 1, bs, bs))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class RefMLP(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.c_fc = nn.Linear(a["n_embd"], 4 * a["n_embd"], bias=a["bias"])
        self.gelu = nn.GELU()  # exact erf GELU
        self.c_proj = nn.Linear(4 * a["n_embd"], a["n_embd"], bias=a["bias"])

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class RefBlock(nn.Module):
    def __init__(self, a, flash):
        super().__init__()
        self.ln_1, self.attn = RefLayerNorm(a["n_embd"], a["bias"]), RefAttention(a, flash)
        self.ln_2, self.mlp = RefLayerNorm(a["n_embd"], a["bias"]), RefMLP(a)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class RefGPT(nn.Module):
    def __init__(self, a, flash=True):
        super().__init__()
        self.block_size = a["block_size"]
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(a["vocab_size"], a["n_embd"]),
            wpe=nn.Embedding(a["block_size"], a["n_embd"]),
            drop=nn.Dropout(a["dropout"]),
            h=nn.ModuleList([RefBlock(a, flash) for _ in range(a["n_layer"])]),
            ln_f=RefLayerNorm(a["n_embd"], a["bias"]),
        ))
        self.lm_head = nn.Linear(a["n_embd"], a["vocab_size"], bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx):
        pos = torch.arange(idx.size(1), dtype=torch.long)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    @torch.no_grad()
    def generate_greedy(self, idx, max_new_tokens):
        for _ in range(max_new_tokens):  # nanoGPT's generate with top_k=1: no cache, cropped context
            logits = self(idx[:, -self.block_size:])[:, -1, :]
            idx = torch.cat((idx, logits.argmax(-1, keepdim=True)), dim=1)
        return idx
