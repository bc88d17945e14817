"""Prototype (naive, L x L) variants of the w16 hedgehog hybrid, trained by attention
transfer for N steps from the same start; prints the teacher-forced attention error."""
import copy, json, math, os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
from linattn.integrations.hf import convert
from linattn.experiments.pretrained import load_pretrained
from linattn.experiments.convert import corpus_texts, pack_texts
from linattn.integrations.hf.transfer import transfer, TransferConfig, attention_errors
from linattn.integrations.hf.state import FavorLayerState

MODE = sys.argv[1]          # ours | lolcats
SINKS = int(sys.argv[2])    # exact first keys
STEPS = int(sys.argv[3])
W = 16

def naive_forward(self, q, k, v, *, key_padding_mask, causal, scale, cache_layer=None):
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    Wp = self.projection  # (H, m, d)
    def phi(x):
        z = (x * math.sqrt(scale)) @ Wp.transpose(-2, -1)
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], -1)
    lf = self.linear_factor().view(1, -1, 1, 1)
    lin = (phi(q) @ phi(k).transpose(-2, -1)) * lf
    s = scale * (q @ k.transpose(-2, -1))
    L = q.shape[-2]
    i = torch.arange(L)[:, None]; j = torch.arange(L)[None, :]
    near = (i - j).abs() <= W
    if SINKS:
        near = near | (j < SINKS)
    pad = key_padding_mask[:, None, None, :] if key_padding_mask is not None else None
    sn = s.masked_fill(~near, -math.inf)
    if pad is not None:
        sn = sn.masked_fill(pad, -math.inf)
    mx = sn.amax(-1, keepdim=True).detach()
    if MODE == "lolcats":
        a = torch.where(near, torch.exp(sn - mx), lin)
    else:  # ours: exp(s) against lin, both divided by exp(max(mx, 0))
        m0 = mx.clamp_min(0)
        a = torch.where(near, torch.exp(sn - m0), lin * torch.exp(-m0))
    if pad is not None:
        a = a.masked_fill(pad, 0.0)
    return (a @ v) / a.sum(-1, keepdim=True)

FavorLayerState.forward = naive_forward
teacher, tok = load_pretrained("minilm")
student = convert(copy.deepcopy(teacher), "favor", kernel="hedgehog", window=W)
train, _ = corpus_texts("gcide", train=20000, test=0, seed=0)
long_train = pack_texts(tok, train[:6000], 512)
from linattn.experiments.convert import eval_sets
sets = eval_sets(tok, ("gcide",), train_corpus="gcide", train_texts=20000, eval_texts=16,
                 lengths=(128, 512), long_eval_texts=16, seed=0)
curve = sets["gcide@512"][0][:16]
cfg = TransferConfig(steps=STEPS, batch_size=4, max_length=512, lr=1e-2, warmup=3,
                     eval_every=STEPS, checkpoint_every=0, seed=0)
t0 = time.time()
log = transfer(student, tok, long_train, curve, cfg, teacher=teacher, progress=False)
print(json.dumps({"mode": MODE, "sinks": SINKS, "steps": STEPS, "secs": round(time.time() - t0),
                  "log": [{k: r[k] for k in ("step", "attn_rel_error", "attn_rel_error_layers", "mean_cosine") if k in r} for r in log]}))
